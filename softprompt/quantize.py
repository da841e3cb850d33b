"""A quantized frozen base for CPU serving and evaluation: int8 Linear layers, prefixes exact in float32.

`quantize_int8(model)` replaces the Linear layers of the frozen base (and GPT-2's Conv1D), all but
the LM head (`KEEP_FLOAT`), with an `Int8Linear`:

    weight   W (N, K) -> int8 with one scale per output channel (symmetric), after smoothing
    input    x (M, K) -> int8 with one scale per row (token), computed at run time
    product  torch._int_mm: int8 x int8 -> int32, exact; times scale_row x scale_channel -> float32

Attention, norms, embeddings, the KV cache and every prefix stay float32: a prefix enters the
attention exactly as on the float32 base; only the base's matmuls change.

Why one scale per row: each row's output then depends on that row alone (the integer products are
exact whatever the batch), so a mixed batch gives each row exactly what it gets alone, and the
prefix self-check holds at float32's tolerance. torch.ao's `quantize_dynamic` scales activations
per tensor, so a row's result depends on the other rows of its batch: on the embedded model the
self-check fails by 14 in the logits, and a padded batch keeps the float32 top-1 token at only
41% of positions.

Why smoothing (SmoothQuant, Xiao et al. 2023, arXiv 2211.10438): a few input channels are 10-6000x
the median (after RMSNorm; into down_proj), and one scale per row then leaves the other channels a
few levels. Dividing input channel j by s_j = sqrt(max|X_j| / max|W_j|) and multiplying W's column
j by s_j moves half of that range into the weights. max|X_j| is calibrated once, on a short text.
On the embedded model (8 E2E references, teacher-forced): top-1 agreement with float32 0.78 -> 0.92,
KL 0.116 -> 0.034 nats per token. Where the BLEU lands: bench/quality_quantized.py.
"""

from __future__ import annotations

import torch
from torch import nn

# A generic calibration text: only each input channel's largest magnitude is taken from it, a
# property of the model far more than of the text.
CALIBRATION_TEXT = (
    "The restaurant by the river serves French food at moderate prices and is family friendly. "
    "Name: The Eagle | type: coffee shop | food: Italian | area: city centre | rating: 5 out of 5. "
    "In 1905 Albert Einstein published four papers that changed physics; the third introduced special "
    "relativity. def add(a, b):\n    return a + b\n# Tomorrow: light rain in the morning, 12 C, wind 20 km/h. "
    "Q: What is the capital of France? A: Paris. Please summarize the following report in one sentence."
)
# Left in float32: the LM head. Measured (60 E2E dev MRs, a 30-step prefix): float32 BLEU 60.1; every
# Linear int8 58.0; all but the head 59.5; all but the head and down_proj 59.9. The head is 21% of the
# embedded model's matmul FLOPs per token, the price of keeping it.
KEEP_FLOAT: tuple[str, ...] = ("lm_head",)
ALPHA = 0.5  # SmoothQuant's migration strength: the share of each channel's range moved into the weights


def _weight(layer: nn.Module) -> torch.Tensor:
    """(N, K) weight of a Linear, or of a transformers Conv1D (which stores it as (K, N))."""
    return layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight


def _quantizable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D"


class Int8Linear(nn.Module):
    """y = x W^T + b with int8 weights (per output channel) and int8 inputs (per row); see the module
    docstring. Inference only (torch._int_mm has no gradient)."""

    def __init__(self, layer: nn.Module, input_absmax: torch.Tensor | None = None, alpha: float = ALPHA):
        super().__init__()
        w = _weight(layer).detach().float()  # (N, K)
        if input_absmax is not None:
            smooth = (input_absmax.float().clamp(min=1e-5) ** alpha
                      / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)  # (K,)
            w = w * smooth
            self.register_buffer("inv_smooth", (1.0 / smooth).contiguous())  # (K,)
        else:
            self.inv_smooth = None
        scale = w.abs().amax(1).clamp(min=1e-12) / 127  # (N,)
        # (N, K) row-major, passed to _int_mm transposed: 2.7x faster than a (K, N) copy for a prefill's
        # 1920 rows (measured, one thread), the same for a decode step's 32
        self.register_buffer("weight_int8", (w / scale[:, None]).round().to(torch.int8).contiguous())  # (N, K)
        self.register_buffer("weight_scale", scale)
        bias = getattr(layer, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()  # (M, K)
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        s = x.abs().amax(1, keepdim=True).clamp_(min=1e-12).div_(127)  # (M, 1)
        q = (x / s).round_().to(torch.int8)
        y = torch._int_mm(q, self.weight_int8.t()).float().mul_(s).mul_(self.weight_scale)  # (M, N)
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The int8 weight (N, K): some models read a layer's `weight.dtype` (T5 casts its input to
        it, unless it is int8, as for other int8 layers)."""
        return self.weight_int8

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, smoothed={self.inv_smooth is not None}"


class _Observer(nn.Module):
    """Wraps a layer during calibration and keeps the largest magnitude of each input channel."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.absmax = layer, None

    @property
    def weight(self) -> torch.Tensor:  # models that read a layer's weight (T5) read the real one
        return self.layer.weight

    def forward(self, x, *args, **kwargs):
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        return self.layer(x, *args, **kwargs)


def _swap(module: nn.Module, make, keep: tuple[str, ...] = ()) -> int:
    """Replace every child layer for which `make(child)` returns a module, except those named in
    `keep`; returns how many."""
    n = 0
    for name, child in module.named_children():
        new = None if name in keep else make(child)
        if new is not None:
            setattr(module, name, new)
            n += 1
        else:
            n += _swap(child, make, keep)
    return n


def supported(device: torch.device | str) -> None:
    """Raise DeviceError where int8 cannot run (its kernels are CPU kernels here)."""
    from .device import DeviceError

    if torch.device(device).type != "cpu":
        raise DeviceError(f"int8 quantization runs on the CPU only, not on {device}; on a GPU use --dtype bfloat16")


@torch.no_grad()
def quantize_int8(model: nn.Module, tokenizer=None, calibration: str | None = CALIBRATION_TEXT,
                  keep: tuple[str, ...] = KEEP_FLOAT) -> nn.Module:
    """Quantize a float32 CPU model's Linear layers in place (see the module docstring); returns it.

    The base's fingerprint is computed first and kept, so artifacts made for the float32 weights
    load on their quantized view. With a tokenizer, inputs are smoothed after one calibration pass
    over `calibration`; without one (or calibration=None), no smoothing (plain per-row int8).
    """
    from .artifact import model_fingerprint

    p = next(model.parameters())
    supported(p.device)
    if p.dtype != torch.float32:
        raise ValueError(f"int8 quantization starts from a float32 model, not {p.dtype}")
    if getattr(model, "softprompt_quantize", None):
        return model
    model_fingerprint(model)  # of the float32 weights: the identity artifacts are checked against
    absmax: dict[int, torch.Tensor] = {}
    if tokenizer is not None and calibration:
        _swap(model, lambda c: _Observer(c) if _quantizable(c) else None)
        cfg = model.config
        limit = min(512, getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 512)
        ids = tokenizer(calibration, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :limit]
        extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
        try:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
        finally:
            def unwrap(c):
                if isinstance(c, _Observer):
                    if c.absmax is not None:
                        absmax[id(c.layer)] = c.absmax
                    return c.layer
                return None
            _swap(model, unwrap)
    n = _swap(model, lambda c: Int8Linear(c, absmax.get(id(c))) if _quantizable(c) else None, keep)
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no Linear layers to quantize")
    model.softprompt_quantize = "int8"
    return model
