"""The one source of defaults: what the library, the command line and the saved run all use.

A method's config (`PrefixTuningConfig`, `PromptTuningConfig`, `PTuningConfig`) and `TrainConfig`
are frozen dataclasses whose defaults are these; the CLI reads its flags' defaults from the same
dataclasses (tests/test_api.py compares them), so `sp.train(...)` from a notebook and `softprompt
train` on the command line start from the same place.

Defaults measured on E2E with the embedded model (docs/benchmarks):
- prefix and prompt tuning start from text (Li & Liang's "activations of real words"; Lester et
  al.'s vocabulary init): a random prefix starts at loss 7.2 against 3.0 for the bare model;
- learning rates: prefix tuning through the MLP 1e-3, a direct prefix 5e-3, prompt tuning 3e-2,
  P-tuning 1e-3.
"""

from __future__ import annotations

INIT_TEXT = "Read the input and write the answer in the same style as the examples."

LR = {"prefix_tuning": 1e-3, "prefix_tuning_direct": 5e-3, "prompt_tuning": 3e-2, "p_tuning": 1e-3}


def default_lr(method: str, projection_dim: int = 512) -> float:
    """The learning rate a method trains at unless told otherwise."""
    if method == "prefix_tuning" and not projection_dim:
        return LR["prefix_tuning_direct"]
    return LR.get(method, 1e-3)


def default_init(method: str, has_tokenizer: bool) -> str | None:
    """Text when a tokenizer is at hand (the CLI always has one); without one, what needs none."""
    if method == "prefix_tuning":
        return "text" if has_tokenizer else "random"
    if method == "prompt_tuning":
        return "text" if has_tokenizer else "vocab"
    return None
