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

from softprompt.hf.errors import PrefixIgnored

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


def _locked() -> dict[str, str] | None:
    """The versions requirements.lock pins (where this is a checkout that has one), by package name."""
    from pathlib import Path

    lock = Path(__file__).resolve().parents[2] / "requirements.lock"
    if not lock.is_file():
        return None
    pins = (line.split("==", 1) for line in lock.read_text().splitlines() if "==" in line and not line.startswith("#"))
    return {name.strip().lower(): version.strip() for name, version in pins}


def advice() -> str:
    """What to do about a failed check: install the tested versions only where they are not the
    ones installed; where they are, the fault is ours or the machine's, and the report is the step."""
    import transformers

    pins = _locked()
    have = {"transformers": transformers.__version__, "torch": torch.__version__}
    if pins is None:
        return f"under {versions()}; report it with this message"
    differ = [f"{k} {v} (locked: {pins[k]})" for k, v in have.items() if k in pins and pins[k] != v]
    if differ:
        return f"under {', '.join(differ)}: install the versions in requirements.lock (bash scripts/setup.sh)"
    return f"under {versions()}, the versions in requirements.lock: a bug, report it with this message"


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
        raise PrefixIgnored(f"{name} ignores the KV prefix ({what}): outputs would be the bare model's, "
                            f"{advice()}")
    if off > tol:
        raise PrefixIgnored(f"{name} does not honour the KV prefix exactly ({what}): logits off by {off:.2e} "
                            f"(tolerance {tol:.1e}), {advice()}")


# How far an int8 base's prefixed logits may stray from its float reference, in multiples of what
# int8 rounding makes of the same tokens written out: the two are two draws of one rounding noise
# (on the embedded model 0.86 and 1.0, max over the vocabulary, on every ISA tried); a dropped
# prefix strays by its whole effect (18.8 there).
NOISE_FACTOR = 3.0


def compare_noisy(ours: torch.Tensor, want: torch.Tensor, bare: torch.Tensor, reference: torch.Tensor, what: str,
                  model) -> None:
    """The int8 half of the self-check (softprompt/hf/prefix.py): `ours`, `want`, `bare` from the int8
    base, `reference` the float reference mode's `want`. Raise PrefixIgnored where the prefixed int8
    logits stray from the reference by more than NOISE_FACTOR times the written-out int8 logits do."""
    from softprompt.core.int8_kernels import describe

    ours, want, bare, reference = ours.double(), want.double(), bare.double(), reference.double()
    noise = float((want - reference).abs().max())
    tol = NOISE_FACTOR * noise + tolerance(torch.float32) * float(reference.abs().max().clamp(min=1.0))
    off, effect = float((ours - reference).abs().max()), float((bare - reference).abs().max())
    if off > tol:
        why = ("as far as without the prefix: the int8 products drop it" if abs(off - effect) <= tol
               else "more than int8 rounding can explain")
        raise PrefixIgnored(f"the int8 {type(model).__name__} strays from its float reference under the KV prefix "
                            f"({what}): logits off by {off:.2e}, against {noise:.2e} for the same tokens written "
                            f"out (tolerance {tol:.1e}; without the prefix {effect:.2e}), {why}; {describe()}. "
                            f"The float32 base is unaffected (drop --quantize)")
