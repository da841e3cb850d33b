"""A quantized frozen base for CPU serving and evaluation: int8 Linear layers, prefixes exact in float32.

`quantize_int8(model)` replaces the Linear layers of the frozen base (and GPT-2's Conv1D) with
`Int8Linear`s:

    weight   W (N, K) -> int8 with one scale per output channel (symmetric), after smoothing
    input    x (M, K) -> int8 with one scale per row (token), computed at run time
    product  int8 x int8 -> exact integer sums; times scale_row x scale_channel -> float32
             (the arithmetic and its kernels: int8_kernels.py)

Layers that read one input tensor (q, k, v; gate, up) share one `Int8Product`: the input is
smoothed and quantized once and multiplied by their weights side by side, each layer taking its
slice. The LM head and every layer that does not widen (attention projections, the MLP's
down-projection), where int8 inputs hurt most, take two levels:
the input's rounding error is quantized in turn (254x finer) and both go through one int8 matmul
of twice the rows, so they act like int8 weights on float inputs.

Attention, norms, embeddings, the KV cache and every prefix stay float32: a prefix enters the
attention exactly as on the float32 base; only the base's matmuls change.

Why one scale per row: each row's output then depends on that row alone (the integer products are
exact whatever the batch), so a mixed batch gives each row exactly what it gets alone, and the
prefix self-check holds at float32's tolerance. torch.ao's `quantize_dynamic` scales activations
per tensor, so a row's result depends on the other rows of its batch: on the embedded model the
self-check fails by 14 in the logits, and a padded batch keeps the float32 top-1 token at only
41% of positions.

Why smoothing, for the one-level layers (SmoothQuant, Xiao et al. 2023, arXiv 2211.10438): a few
input channels are 10-6000x the median (after RMSNorm; into down_proj), and one scale per row then
leaves the other channels a few levels. Dividing input channel j by s_j = sqrt(max|X_j| / max|W_j|) and multiplying W's column
j by s_j moves half of that range into the weights. max|X_j| is calibrated once, on a short text.
On the embedded model (8 E2E references, teacher-forced): top-1 agreement with float32 0.78 -> 0.92,
KL 0.116 -> 0.034 nats per token. Where the BLEU lands: bench/quality_quantized.py.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from . import int8_kernels as kernels

# A generic calibration text: only each input channel's largest magnitude is taken from it, a
# property of the model far more than of the text.
CALIBRATION_TEXT = (
    "The restaurant by the river serves French food at moderate prices and is family friendly. "
    "Name: The Eagle | type: coffee shop | food: Italian | area: city centre | rating: 5 out of 5. "
    "In 1905 Albert Einstein published four papers that changed physics; the third introduced special "
    "relativity. def add(a, b):\n    return a + b\n# Tomorrow: light rain in the morning, 12 C, wind 20 km/h. "
    "Q: What is the capital of France? A: Paris. Please summarize the following report in one sentence."
)
# Two levels of input quantization for these (by name) and for every layer that does not widen
# (attention projections, MLP down-projections). Measured (200 E2E dev MRs, bench/quality_quantized.py,
# BLEU float32 57.12): one level everywhere but the head in float32 55.73; two levels for the head and
# the down-projections 55.97; and for the attention projections too 56.69; for every layer 55.55
# (but 76% of outputs identical to float32's, the most): a BLEU delta of about 1 is the noise of
# 200 outputs that differ in a quarter of them.
PRECISE: tuple[str, ...] = ("lm_head",)
ALPHA = 0.5  # SmoothQuant's migration strength: the share of each channel's range moved into the weights


def _weight(layer: nn.Module) -> torch.Tensor:
    """(N, K) weight of a Linear, or of a transformers Conv1D (which stores it as (K, N))."""
    return layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight


def _quantizable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D"


class Int8Product(nn.Module):
    """The int8 weights of one or more Linear layers that read the same input (a layer's q, k and v
    projections; its gate and up projections): one smoothing, one quantization of the input and one
    int8 matmul for all of them, each layer taking its slice (`part`). On the embedded model's decode
    step the per-row quantization of the input was about as costly as the int8 matmul itself, and a
    layer quantizes 4 inputs instead of 7 this way. Inference only (torch._int_mm has no gradient)."""

    def __init__(self, layers: list[nn.Module], input_absmax: torch.Tensor | None = None, alpha: float = ALPHA,
                 levels: int = 1):
        super().__init__()
        self.levels = levels
        weights = [_weight(layer).detach().float() for layer in layers]  # each (N_i, K)
        w = torch.cat(weights)  # (N, K)
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
        biases = [getattr(layer, "bias", None) for layer in layers]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(len(wi)) for b, wi in zip(biases, weights)])
        self.register_buffer("bias", bias)
        self.sizes = [len(wi) for wi in weights]
        kernels.pack(self.weight_int8)
        # per thread (the loader thread compiles prompts while the engine decodes): the input last
        # multiplied and the parts of its product not yet taken
        self._last = threading.local()

    def __getstate__(self):  # deepcopy and pickle: a thread-local cache is neither copied nor picklable
        return {k: v for k, v in self.__dict__.items() if k != "_last"}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._last = threading.local()
        kernels.pack(self.weight_int8)  # a copy's weights are new tensors, packed anew

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N): every layer's output, side by side."""
        parts = self.parts(x)
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(..., K) -> each layer's output (..., N_i), contiguous."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()  # (M, K)
        args = (self.weight_int8, self.weight_scale, self.inv_smooth, self.bias, self.sizes, self.levels)
        return [p.view(*shape[:-1], p.shape[-1]) for p in kernels.product(x, *args)]

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Layer i's output for input x: from the product already made for this very tensor (same
        object, not modified since) if there is one, else from a new product. A part is handed out
        once, then forgotten, so no product outlives the layers that read it."""
        if len(self.sizes) == 1:
            return self.parts(x)[0]
        last = self._last
        parts = getattr(last, "parts", None)
        if parts is None or last.x is not x or last.version != x._version or parts[i] is None:
            parts = self.parts(x)
            last.x, last.version, last.parts = x, x._version, parts
        out, parts[i] = parts[i], None
        if all(p is None for p in parts):
            last.x = last.parts = None
        return out


class Int8Linear(nn.Module):
    """y = x W^T + b with int8 weights (per output channel) and int8 inputs (per row); see the module
    docstring. Layer `index` of an `Int8Product` (made here for this layer alone when none is given)."""

    def __init__(self, layer: nn.Module, input_absmax: torch.Tensor | None = None, alpha: float = ALPHA, *,
                 shared: Int8Product | None = None, index: int = 0):
        super().__init__()
        self.shared = shared if shared is not None else Int8Product([layer], input_absmax, alpha)
        self.index = index
        w = _weight(layer)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)

    @property
    def weight(self) -> torch.Tensor:
        """The int8 weight (N, K): some models read a layer's `weight.dtype` (T5 casts its input to
        it, unless it is int8, as for other int8 layers)."""
        start = sum(self.shared.sizes[:self.index])
        return self.shared.weight_int8[start:start + self.out_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"smoothed={self.shared.inv_smooth is not None}, shares_input_with={len(self.shared.sizes) - 1}")


class _Observer(nn.Module):
    """Wraps a layer during calibration and keeps the largest magnitude of each input channel."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.absmax, self.first_input = layer, None, None

    @property
    def weight(self) -> torch.Tensor:  # models that read a layer's weight (T5) read the real one
        return self.layer.weight

    def forward(self, x, *args, **kwargs):
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if self.first_input is None:  # held (not just its id) until grouping, so no id is reused
            self.first_input = x
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


def _widening(layer: nn.Module) -> bool:
    """More outputs than inputs: an MLP's gate and up projections (and the LM head)."""
    w = _weight(layer)
    return w.shape[0] > w.shape[1]


@torch.no_grad()
def quantize_int8(model: nn.Module, tokenizer=None, calibration: str | None = CALIBRATION_TEXT,
                  keep: tuple[str, ...] = (), precise: tuple[str, ...] = PRECISE) -> nn.Module:
    """Quantize a float32 CPU model's Linear layers in place (see the module docstring); returns it.

    The base's fingerprint is computed first and kept, so artifacts made for the float32 weights
    load on their quantized view. With a tokenizer, inputs are smoothed after one calibration pass
    over `calibration`, and layers that read the same input share one int8 product; without one (or
    calibration=None), plain per-row int8, one product per layer. Layers named in `keep` stay
    float32; those named in `precise` (the LM head) and those that do not widen get two levels of
    input quantization (and no smoothing: their inputs are fine enough, their weights better without).
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
    groups: dict[int, list[nn.Module]] = {}  # id(a calibration input) -> the layers that read it, in order
    if tokenizer is not None and calibration:
        _swap(model, lambda c: _Observer(c) if _quantizable(c) else None, keep)
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
                        groups.setdefault(id(c.first_input), []).append(c.layer)
                    return c.layer
                return None
            _swap(model, unwrap)  # (the inputs go with the observers, after every id is taken)
    # two levels for all but the widening layers (the MLP's gate and up: most of a layer's FLOPs), and
    # for the layers named in `precise` (the LM head, which widens to the vocabulary)
    two_levels = {id(m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in precise}
    two_levels |= {id(m) for m in model.modules() if _quantizable(m) and not _widening(m)}
    group_of = {id(m): g for g in groups.values() for m in g}  # id(layer) -> the layers reading its input
    shared: dict[int, tuple[Int8Product, int]] = {}  # id(layer) -> (its group's product, its index there)

    def make(c: nn.Module) -> nn.Module | None:
        if not _quantizable(c):
            return None
        if id(c) not in shared:
            group = group_of.get(id(c), [c])
            # one product for layers that read one input and are quantized alike; one smoothing for
            # them too: the input is one tensor, its channels' magnitudes are the group's
            members = [m for m in group if (id(m) in two_levels) == (id(c) in two_levels)]
            if id(c) in two_levels:  # inputs this fine need no smoothing, and weights are better without
                prod = Int8Product(members, None, levels=2)
            else:
                prod = Int8Product(members, absmax.get(id(c)))
            shared.update({id(m): (prod, i) for i, m in enumerate(members)})
        prod, i = shared[id(c)]
        return Int8Linear(c, shared=prod, index=i)

    n = _swap(model, make, keep)
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no Linear layers to quantize")
    kernels.warm_up()
    model.softprompt_quantize = "int8"
    return model
