"""Prompt methods, one file each, behind the `PromptMethod` protocol (see base.py)."""

from .base import InputPromptMethod, PromptMethod
from .p_tuning import PTuning, PTuningConfig
from .prefix_tuning import PrefixTuning, PrefixTuningConfig
from .prompt_tuning import PromptTuning, PromptTuningConfig

METHODS: dict[str, type[PromptMethod]] = {
    PromptTuning.method: PromptTuning,
    PrefixTuning.method: PrefixTuning,
    PTuning.method: PTuning,
}
CONFIGS = {
    PromptTuning.method: PromptTuningConfig,
    PrefixTuning.method: PrefixTuningConfig,
    PTuning.method: PTuningConfig,
}
ALIASES = {"prompt": "prompt_tuning", "prefix": "prefix_tuning", "ptuning": "p_tuning", "p-tuning": "p_tuning"}


def canonical(method: str) -> str:
    name = ALIASES.get(method, method).replace("-", "_")
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return name


def create(method: str, model, tokenizer=None, **options) -> PromptMethod:
    """A freshly initialized prompt of `method` for `model`; options are the method's config fields."""
    name = canonical(method)
    return METHODS[name].create(model, tokenizer, CONFIGS[name](**options))


__all__ = ["PromptMethod", "InputPromptMethod", "PromptTuning", "PrefixTuning", "PTuning", "METHODS", "CONFIGS", "create", "canonical",
           "PromptTuningConfig", "PrefixTuningConfig", "PTuningConfig"]
