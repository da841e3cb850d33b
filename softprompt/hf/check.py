"""The self-check that turns a silently dropped prefix into a loud error.

A transformers release may rename a keyword, accept and ignore an unknown one, or change how a
cache is read. Any of those would make every prefix a no-op, and outputs would simply be the bare
model's. So before a model serves or trains with a prefix, one cheap test must pass (once per
model object, three short forward passes):

    compile 4 random tokens x into a KV prefix (the model's own cache over x), then
    logits(y | prefix) == logits(x + y)[at y]  (prefix honoured, positions P, P+1, ...)
    logits(y | prefix) != logits(y)            (the prefix did something at all)

The reference is the model's plain forward over the concatenated text: independent of how a
cache is passed, so a dropped, misplaced or mis-masked prefix cannot pass it.
"""

from __future__ import annotations

import weakref

import torch

from .errors import PrefixIgnored

_checked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def once(model, check) -> None:
    """Run `check(model)` the first time a model object is seen (marked first, so a check that
    itself runs prefixed passes does not recurse)."""
    if model in _checked:
        return
    _checked[model] = True
    try:
        check(model)
    except BaseException:
        _checked.pop(model, None)
        raise


def versions() -> str:
    import transformers

    return f"transformers {transformers.__version__}, torch {torch.__version__}"


def tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def compare(ours: torch.Tensor, want: torch.Tensor, bare: torch.Tensor, what: str, model) -> None:
    """Raise PrefixIgnored unless `ours` matches `want` and differs from `bare` (logits of the same
    shape). Tolerances are relative to the logits' scale."""
    ours, want, bare = ours.double(), want.double(), bare.double()
    scale = want.abs().max().clamp(min=1.0)
    tol = tolerance(next(model.parameters()).dtype) * float(scale)
    off, effect = float((ours - want).abs().max()), float((bare - want).abs().max())
    name = type(model).__name__
    if effect <= tol:
        raise PrefixIgnored(f"self-check inconclusive on {name}: {what} does not change the logits at all "
                            f"(max effect {effect:.2e}); is the model degenerate? ({versions()})")
    if float((ours - bare).abs().max()) <= tol:
        raise PrefixIgnored(f"{name} ignores the KV prefix ({what}): outputs would be the bare model's. "
                            f"Unsupported under {versions()}; install the versions in requirements.lock "
                            f"(bash scripts/setup.sh) or report the release")
    if off > tol:
        raise PrefixIgnored(f"{name} does not honour the KV prefix exactly ({what}): logits off by {off:.2e} "
                            f"(tolerance {tol:.1e}) under {versions()}; install the versions in requirements.lock")
