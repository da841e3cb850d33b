"""The off-task guard's summary of a task's inputs and the score of one input against it.

A prefix is trained on one kind of input and quietly degrades others. The guard keeps, per task, a
compact summary of the training inputs in the model's own representation and scores each request
against it; what the summary is made of (loops/offtask.py) and where serving reads the state from
(serve/engine.py) are elsewhere. This module is the math alone: tensors in, numbers out.

The state of one input: its **pooled hidden state** `x` (d,), the mean over the input's own tokens
of the residual stream after `layer` decoder layers (HF's `hidden_states[layer]`), computed *under
the task's prefix*, exactly as the engine's prefill computes it (so serving pays only a mean and a
few small products; see loops/offtask.py for why not the bare base).

The summary is a probabilistic PCA of the training inputs' states (Tipping & Bishop 1999): their
mean `mu`, the top `k` principal directions `C` (k, d) with their variances `lam` (k,), and one
variance `sigma2` for every other direction (the mean of the remaining eigenvalues). Its score is
the squared Mahalanobis distance under that model, per dimension:

    z = x - mu;  p = C z                                          # (k,) coordinates in the subspace
    score(x) = ( sum_j p_j^2 / lam_j  +  (|z|^2 - |p|^2) / sigma2 ) / d

about 1 for an input like the training ones, large for one off the training manifold: the second
term sees directions the task's inputs never moved in. `threshold` is a quantile (default 0.99) of
the scores of held-out in-task inputs (never the fitted ones: a fitted point sits closer than a new
one from the same task, the more so the fewer points per dimension). Size: (k + 1) x d floats plus
k + 1, e.g. 39 KB for SmolLM2-135M (d 576) at k 16, stored as float32 safetensors (never pickled).
Scores are computed in float64 from the float32 summary, so a saved and reloaded summary scores
exactly as the one that was calibrated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

FORMAT = "softprompt-offtask"
FORMAT_VERSION = 1
MAX_BYTES = 64 << 20  # a summary file larger than this is refused before parsing (d 16384 at k 64 is 4 MB)
POLICIES = ("warn", "reject", "base")  # what a server does with a request past the threshold


class OffTaskError(ValueError):
    """A summary that cannot be made or read; the message says what is wrong."""


@dataclass(frozen=True)
class OffTaskScore:
    """One request's off-task score against its task's summary, as the result carries it.

    score: see the module docstring (about 1 in-task); threshold: the task's calibrated cut;
    off_task: score > threshold; action: what the engine did: "none" (in-task), "warn" (served
    as asked, flagged), "reject" (refused before decoding) or "base" (served without the prefix)."""

    score: float
    threshold: float
    off_task: bool
    action: str = "none"

    def to_dict(self) -> dict:
        """The JSON an HTTP response's `softprompt` extension carries."""
        return {"score": round(self.score, 6), "threshold": round(self.threshold, 6), "off_task": self.off_task,
                "action": self.action}

    def header(self) -> str:
        """The `x-softprompt-off-task` header value: `score=1.234567; threshold=2.5; off_task=0`."""
        return f"score={self.score:.6g}; threshold={self.threshold:.6g}; off_task={int(self.off_task)}"


@dataclass(frozen=True)
class OffTaskSummary:
    """The PPCA summary of a task's inputs (see the module docstring). Tensors are float32 on the CPU."""

    layer: int  # hidden state after this many decoder layers (1..L)
    mean: torch.Tensor  # (d,)
    components: torch.Tensor  # (k, d), orthonormal rows
    variances: torch.Tensor  # (k,), descending, each >= residual
    residual: float  # sigma2: the variance of every direction outside the k
    threshold: float
    meta: dict = field(default_factory=dict, compare=False)  # n_fit, n_heldout, quantile, base, under, ...

    @property
    def hidden_size(self) -> int:
        return int(self.mean.shape[0])

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.components, self.variances))

    # ---- scoring ------------------------------------------------------------------------
    def score(self, states: torch.Tensor) -> torch.Tensor:
        """Scores (N,) float64 of pooled states (N, d) (any dtype or device; computed on the CPU)."""
        x = states.detach().to("cpu", torch.float64)
        z = x - self.mean.double()  # (N, d)
        p = z @ self.components.double().T  # (N, k)
        inside = (p.square() / self.variances.double()).sum(-1)
        outside = (z.square().sum(-1) - p.square().sum(-1)).clamp(min=0) / self.residual
        return (inside + outside) / self.hidden_size

    def judge(self, score: float, policy: str) -> OffTaskScore:
        """The result of `score` under `policy` (one of POLICIES): the action is the policy's when past
        the threshold, "none" otherwise."""
        over = bool(score > self.threshold)
        return OffTaskScore(float(score), self.threshold, over, policy if over else "none")

    # ---- fitting ------------------------------------------------------------------------
    @staticmethod
    def fit(states: torch.Tensor, heldout: torch.Tensor, layer: int, *, k: int = 16, quantile: float = 0.99,
            meta: dict | None = None) -> "OffTaskSummary":
        """The summary of fitted states (n, d), its threshold the `quantile` of the scores of `heldout`
        states (m, d), inputs of the same task that were not fitted."""
        if states.ndim != 2 or states.shape[0] < 2:
            raise OffTaskError(f"fitting needs at least 2 pooled states (n, d), got shape {tuple(states.shape)}")
        if heldout.ndim != 2 or heldout.shape[0] < 1 or heldout.shape[1] != states.shape[1]:
            raise OffTaskError(f"calibrating needs held-out states (m, {states.shape[1]}), got {tuple(heldout.shape)}")
        if not 0 < quantile <= 1:
            raise OffTaskError(f"quantile must be in (0, 1], got {quantile}")
        x = states.detach().to("cpu", torch.float64)
        n, d = x.shape
        mu = x.mean(0)
        xc = x - mu
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)  # xc = U diag(s) Vh; eigenvalues s^2 / (n - 1)
        eig = s.square() / (n - 1)
        k = max(1, min(k, n - 1, d - 1))
        total = xc.square().sum() / (n - 1)
        rest = (total - eig[:k].sum()).clamp(min=0) / (d - k)  # the discarded directions' mean variance
        floor = total / d * 1e-6 + torch.finfo(torch.float32).tiny  # a constant input still scores finitely
        sigma2 = float(max(rest, floor))
        # stored as float32: the threshold is calibrated with the rounded summary, which is what is saved
        summary = OffTaskSummary(layer, mu.float(), vh[:k].float().contiguous(), eig[:k].clamp(min=sigma2).float(),
                                 float(torch.tensor(sigma2, dtype=torch.float32)), math.inf, dict(meta or {}))
        held = summary.score(heldout)
        threshold = float(torch.quantile(held, quantile))
        info = {"n_fit": n, "n_heldout": int(heldout.shape[0]), "quantile": quantile, "k": k,
                "heldout_median": float(held.median())}
        return OffTaskSummary(layer, summary.mean, summary.components, summary.variances, summary.residual,
                              threshold, {**summary.meta, **info})

    # ---- bytes --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        head = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layer": str(self.layer),
                "residual": repr(self.residual), "threshold": repr(self.threshold), "meta": json.dumps(self.meta)}
        return save({"mean": self.mean.contiguous(), "components": self.components.contiguous(),
                     "variances": self.variances.contiguous()}, metadata=head)

    @staticmethod
    def from_bytes(blob: bytes, where: str = "the summary") -> "OffTaskSummary":
        """Parse and check a summary file's bytes (OffTaskError naming `where` otherwise)."""
        import struct

        from safetensors.torch import load

        if len(blob) > MAX_BYTES:
            raise OffTaskError(f"{where} is {len(blob)} bytes, over the limit of {MAX_BYTES}")
        try:
            tensors = load(blob)
            (n,) = struct.unpack("<Q", blob[:8])
            head = json.loads(blob[8:8 + n])["__metadata__"]
            if head.get("format") != FORMAT or int(head["format_version"]) > FORMAT_VERSION:
                raise OffTaskError(f"{where} is not a {FORMAT} file of version <= {FORMAT_VERSION}")
            layer, residual, threshold = int(head["layer"]), float(head["residual"]), float(head["threshold"])
            meta = json.loads(head.get("meta") or "{}")
            mean, comp, var = tensors["mean"], tensors["components"], tensors["variances"]
        except OffTaskError:
            raise
        except Exception as e:  # noqa: BLE001  truncated, not safetensors, fields missing
            raise OffTaskError(f"{where} does not parse as an off-task summary ({type(e).__name__}: {e})") from None
        d = mean.shape[0] if mean.ndim == 1 else -1
        ok = (mean.ndim == 1 and comp.ndim == 2 and comp.shape[1] == d and var.shape == (comp.shape[0],)
              and all(t.dtype == torch.float32 for t in (mean, comp, var)) and layer >= 1 and residual > 0
              and bool(torch.isfinite(mean).all() and torch.isfinite(comp).all()) and bool((var > 0).all())
              and not math.isnan(threshold) and isinstance(meta, dict))
        if not ok:
            raise OffTaskError(f"{where} has inconsistent shapes or values (mean {tuple(mean.shape)}, components "
                               f"{tuple(comp.shape)}, variances {tuple(var.shape)}, layer {layer}, residual {residual})")
        return OffTaskSummary(layer, mean, comp, var, residual, threshold, meta)


def pool(hidden: torch.Tensor, lengths: torch.Tensor | list[int]) -> torch.Tensor:
    """Mean over each row's own tokens of left-padded states: hidden (B, T, d), lengths (B,), row i's
    tokens its last lengths[i] positions (padding on the left, no prefix in `hidden`). (B, d) float32."""
    B, T, _ = hidden.shape
    n = torch.as_tensor(lengths, device=hidden.device).view(B, 1)
    keep = torch.arange(T, device=hidden.device).view(1, T) >= (T - n)  # (B, T)
    return (hidden.float() * keep.unsqueeze(-1)).sum(1) / n.float()


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """ROC AUC of scores: the chance a positive (off-task) input outscores a negative (in-task) one,
    ties counting half (the Mann-Whitney U statistic)."""
    pos, neg = positive.double().view(-1, 1), negative.double().view(1, -1)
    if not pos.numel() or not neg.numel():
        raise ValueError("AUC needs at least one score on each side")
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())
