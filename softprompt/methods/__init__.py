"""Prompt methods, one file each, behind the `PromptMethod` protocol (see base.py).

The configs (config.py) are torch-free and load at once; the method classes (and torch) load on
first use of a name here, so the command line can build its parser from the configs quickly.
"""

import os

from softprompt.methods.config import (ALIASES, CONFIGS, PromptTuningConfig, PrefixTuningConfig,  # noqa: F401
                                       PTuningConfig, canonical)

_LAZY = {
    "PromptMethod": "softprompt.methods.base",
    "InputPromptMethod": "softprompt.methods.base",
    "PromptTuning": "softprompt.methods.prompt_tuning",
    "PrefixTuning": "softprompt.methods.prefix_tuning",
    "PTuning": "softprompt.methods.p_tuning",
}


def __getattr__(name: str):
    import importlib

    if name == "METHODS":
        from softprompt.methods.p_tuning import PTuning
        from softprompt.methods.prefix_tuning import PrefixTuning
        from softprompt.methods.prompt_tuning import PromptTuning

        methods = {cls.method: cls for cls in (PromptTuning, PrefixTuning, PTuning)}
        globals()["METHODS"] = methods
        return methods
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'softprompt.methods' has no attribute {name!r}")


def create(method: str, model, tokenizer=None, **options):
    """A freshly initialized prompt of `method` for `model`; options are the method's config fields.
    Sizes are checked before anything is allocated (see check_size)."""
    name = canonical(method)
    config = CONFIGS[name](**options)
    check_size(model, name, config.num_virtual_tokens, getattr(config, "projection_dim", 0))
    return __getattr__("METHODS")[name].create(model, tokenizer, config)


def estimate_bytes(geo, method: str, num_virtual_tokens: int, projection_dim: int = 0) -> int:
    """A generous estimate of the memory training a prompt of P virtual tokens takes beyond the
    frozen model: per virtual token its input embedding (d), its K/V at every layer (L*2*kv_dim)
    and the MLP's hidden width (k), each held ~4 times (value, gradient, Adam's two moments)."""
    per_token = geo.hidden_size + geo.num_layers * 2 * geo.kv_dim + (projection_dim if method != "prompt_tuning" else 0)
    return 4 * 4 * num_virtual_tokens * per_token


def available_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no estimate
        return None


def check_size(model, method: str, num_virtual_tokens: int, projection_dim: int = 0) -> None:
    """Refuse (ValueError, one line) a prompt that cannot fit: P virtual tokens take P positions
    before the text, so P must leave room in the model's context; and its memory estimate must fit
    in half of the free memory (P = 100000 with prefix tuning was killed by the kernel at 22 GB)."""
    from softprompt.core.geometry import geometry

    geo = geometry(model)
    P, ctx = num_virtual_tokens, geo.max_position_embeddings
    if ctx and P >= ctx:
        raise ValueError(f"num_virtual_tokens {P} does not fit the model's context of {ctx} positions (the text "
                         f"comes after the prompt): use at most {ctx - 1}, in practice tens to a few hundred")
    need, free = estimate_bytes(geo, method, P, projection_dim), available_bytes()
    if free is not None and need > free // 2:
        raise ValueError(f"num_virtual_tokens {P} with {method} needs about {need / 2**30:.1f} GiB, more than half of "
                         f"the {free / 2**30:.1f} GiB of free memory: use a smaller num_virtual_tokens")


__all__ = ["PromptMethod", "InputPromptMethod", "PromptTuning", "PrefixTuning", "PTuning", "METHODS", "CONFIGS", "create", "canonical", "check_size",
           "PromptTuningConfig", "PrefixTuningConfig", "PTuningConfig"]
