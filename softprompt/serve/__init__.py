"""Serving: the engine (many tasks on one frozen model, mixed batches) apart from any HTTP layer.

Names load on first use, so importing `softprompt.serve.main` (the CLI does, for `serve`'s flags)
does not pull in torch."""

_EXPORTS = {"Engine": "engine", "Request": "handle", "Completion": "handle", "Event": "handle", "Handle": "handle",
            "TaskRegistry": "tasks", "Task": "tasks", "PrefixCache": "tasks", "QueueFull": "tasks", "RequestError": "tasks",
            "UnknownTask": "tasks", "TaskRefused": "tasks"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softprompt.serve' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
