"""A quantized frozen base for CPU serving and evaluation: int8 Linear layers, prefixes exact in float32.

`quantize_int8(model)` replaces the Linear layers of the frozen base (and GPT-2's Conv1D) with
`Int8Linear`s:

    rotate   x (M, K) -> x H, W (N, K) -> W H: H a Hadamard matrix on each block of 64 channels
    weight   W H -> int8 with one scale per output channel (symmetric)
    input    x H -> int8 (or 7-bit, see int8_kernels.py) with one scale per row (token), at run time
    product  exact integer sums; times scale_row x scale_channel -> float32 = x W^T (as x H H^T W^T)
             (the arithmetic and its kernels: int8_kernels.py)

Layers that read one input tensor (q, k, v; gate, up) share one `Int8Product`: the input is
rotated and quantized once and multiplied by their weights side by side, each layer taking its
slice. Layers whose input is wider than the hidden state (the MLP's down-projection, whose input
has the largest outliers) take two levels: the input's rounding error is quantized in turn (2 x 127
or 2 x 63 times finer) and both go through one int8 matmul of twice the rows, so they act like int8
weights on float inputs.

Attention, norms, embeddings, the KV cache and every prefix stay float32: a prefix enters the
attention exactly as on the float32 base; only the base's matmuls change.

Why one scale per row: each row's output then depends on that row alone (the integer products are
exact whatever the batch), so a mixed batch gives each row exactly what it gets alone. torch.ao's
`quantize_dynamic` scales activations per tensor, so a row's result depends on the other rows of its
batch: on the embedded model the prefix self-check failed by 14 in the logits, and a padded batch
kept the float32 top-1 token at only 41% of positions.

Why the rotation (as QuaRot, Ashkboos et al. 2024, arXiv 2404.00456, with a block-diagonal Hadamard):
a few input channels are 10-6000x the median (after RMSNorm; into down_proj), and one scale per
row then leaves the other channels a few levels. An orthogonal H spreads each outlier over its
block of 64 channels, and x W^T is unchanged. It replaced SmoothQuant's per-channel smoothing
(Xiao et al. 2023), which moves half of each channel's range into the weights. Measured on the
embedded model (40 E2E dev texts, teacher-forced, KL to float32 in nats per token; one level
everywhere but the named layers; 8-bit inputs / 7-bit inputs):

    smoothing (alpha 0.5), two levels for the head and every layer that does not widen   0.0107 / 0.0194
    rotation, one level everywhere                                                      0.0103 / 0.0212
    rotation, two levels for the down-projections                                       0.0080 / 0.0156
    rotation, two levels for the head and the down-projections                          0.0073 / 0.0129

The third is the default: fewer two-level rows than the first (the head alone took 30% of a
decode step at two levels), and closer to float32 on both kinds of CPU. BLEU: bench/quality_quantized.py.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from softprompt.core import int8_kernels as kernels

# A generic calibration text: it finds which layers read one input (to share a product), and the int8
# base is compared with its float32 self over it.
CALIBRATION_TEXT = (
    "The restaurant by the river serves French food at moderate prices and is family friendly. "
    "Name: The Eagle | type: coffee shop | food: Italian | area: city centre | rating: 5 out of 5. "
    "In 1905 Albert Einstein published four papers that changed physics; the third introduced special "
    "relativity. def add(a, b):\n    return a + b\n# Tomorrow: light rain in the morning, 12 C, wind 20 km/h. "
    "Q: What is the capital of France? A: Paris. Please summarize the following report in one sentence."
)
# Layers given two levels of input quantization besides those whose input is wider than the hidden
# state (by name, e.g. "lm_head"; see the table in the module docstring).
PRECISE: tuple[str, ...] = ()
BLOCK = 64  # the Hadamard rotation's block of channels (32: 0.0156 -> 0.0285 above with 7 bits; 512: no better)


def _block(K: int) -> int:
    """The rotation's block for K input channels: BLOCK, or the largest power of two dividing K."""
    return min(BLOCK, K & -K)


def _rotate_weight(w: torch.Tensor, block: int) -> torch.Tensor:
    """W (N, K) -> W H / block, H the unnormalized Hadamard of the input's rotation (H H^T = block I):
    then (x H)(W H / block)^T = x W^T. In float64: the weights are quantized after, once."""
    return kernels.rotate(w.double(), block).div_(block).float() if block > 1 else w


class QuantizationError(RuntimeError):
    """The int8 base strays from its float32 reference by more than int8 rounding can: the int8
    arithmetic on this CPU is broken (the message names the CPU, the kernel path and the error)."""


# Float reference mode (per thread): every int8 product computes x W^T + b in float32 with its
# dequantized weights, inputs unquantized, so the quantized model is a plain float32 model with the
# same modules, attention and cache. See `float_reference`.
_reference = threading.local()


@contextlib.contextmanager
def float_reference():
    """Within this block (in this thread), int8 products multiply in float32 by their dequantized
    weights instead of quantizing their inputs.

    Why: per-row input quantization is a function of each token's own vector, so it cannot move
    anything between positions; but it magnifies the last-bit differences between two float32
    attentions over the same tokens (a prefill of 7 tokens and 4 cached + 3 round differently), and
    on the embedded model the int8 logits of the two differ by ~0.9 where float32's differ by 5e-5.
    The prefix self-check runs here, at float32's tolerance, to prove the prefix is honoured exactly
    by this very model; the int8 arithmetic is then held to its own measured noise."""
    before = getattr(_reference, "on", False)
    _reference.on = True
    try:
        yield
    finally:
        _reference.on = before


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "softprompt_quantize", None))


def _weight(layer: nn.Module) -> torch.Tensor:
    """(N, K) weight of a Linear, or of a transformers Conv1D (which stores it as (K, N))."""
    return layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight


def _quantizable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D"


class Int8Product(nn.Module):
    """The int8 weights of one or more Linear layers that read the same input (a layer's q, k and v
    projections; its gate and up projections): one rotation, one quantization of the input and one
    int8 matmul for all of them, each layer taking its slice (`part`). On the embedded model's decode
    step the per-row quantization of the input was about as costly as the int8 matmul itself, and a
    layer quantizes 4 inputs instead of 7 this way. Inference only (the int8 matmul has no gradient)."""

    def __init__(self, layers: list[nn.Module], levels: int = 1):
        super().__init__()
        self.levels = levels
        weights = [_weight(layer).detach().float() for layer in layers]  # each (N_i, K)
        self.block = _block(weights[0].shape[1])
        w = _rotate_weight(torch.cat(weights), self.block)  # (N, K)
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
        if getattr(_reference, "on", False):
            parts = self._dequantized(x)
        else:
            args = (self.weight_int8, self.weight_scale, self.block, self.bias, self.sizes, self.levels)
            parts = kernels.product(x, *args)
        return [p.view(*shape[:-1], p.shape[-1]) for p in parts]

    def _dequantized(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (M, K) -> each layer's (M, N_i) in float32 by the dequantized weights (`float_reference`)."""
        if self.block > 1:
            x = kernels.rotate(x, self.block)
        w = self.weight_int8.float() * self.weight_scale[:, None]  # (N, K)
        y = nn.functional.linear(x, w, self.bias)
        return [p.contiguous() for p in y.split(self.sizes, 1)]

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Layer i's output for input x: from the product already made for this very tensor (same
        object, not modified since) if there is one, else from a new product. A part is handed out
        once, then forgotten, so no product outlives the layers that read it."""
        if len(self.sizes) == 1 or getattr(_reference, "on", False):
            return self.parts(x)[i]
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

    def __init__(self, layer: nn.Module, levels: int = 1, *, shared: Int8Product | None = None, index: int = 0):
        super().__init__()
        self.shared = shared if shared is not None else Int8Product([layer], levels)
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
                f"rotation_block={self.shared.block}, levels={self.shared.levels}, "
                f"shares_input_with={len(self.shared.sizes) - 1}")


class _Observer(nn.Module):
    """Wraps a layer during calibration and keeps the first input it reads (to group the layers
    that read one tensor)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.first_input = layer, None

    @property
    def weight(self) -> torch.Tensor:  # models that read a layer's weight (T5) read the real one
        return self.layer.weight

    def forward(self, x, *args, **kwargs):
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


# The int8 base's logits may stray from float32's by this share of their spread (RMS over the
# calibration text, each position's mean removed) before quantization is declared broken. Measured on
# the embedded model: 0.090 with 8-bit inputs, 0.118 with 7-bit ones; the s8-input matmul on a CPU
# without VNNI (sums saturating in int16; int8_kernels.path() now avoids it) gave 0.30 under the old
# smoothing scheme, and logits unrelated to float32's give ~1.4. The exact-sum probe of
# int8_kernels.path() is the first guard against such a matmul; this bound is the second, over the
# whole model, at twice the noise of a sound int8 base.
MAX_ERROR = 0.25


def _verify(got: torch.Tensor, want: torch.Tensor, name: str) -> float:
    """The relative RMS error of int8 logits `got` against float32's `want` (same shape); raises
    QuantizationError past MAX_ERROR."""
    got, want = got.double(), want.double()
    spread = (want - want.mean(-1, keepdim=True)).pow(2).mean().sqrt().clamp(min=1e-12)
    err = float((got - want).pow(2).mean().sqrt() / spread)
    if not err <= MAX_ERROR:  # NaN too
        raise QuantizationError(
            f"the int8 {name} strays from its float32 self by {err:.3f} of the logits' spread (int8 rounding "
            f"gives ~0.05, the bound is {MAX_ERROR}): the int8 arithmetic is broken on this machine "
            f"({kernels.describe()}); set SOFTPROMPT_INT8_KERNELS=torch to try the plain torch ops, "
            f"or serve in float32 (drop --quantize)")
    return err


def supported(device: torch.device | str) -> None:
    """Raise DeviceError where int8 cannot run (its kernels are CPU kernels here)."""
    from softprompt.core.device import DeviceError

    if torch.device(device).type != "cpu":
        raise DeviceError(f"int8 quantization runs on the CPU only, not on {device}; on a GPU use --dtype bfloat16")


def _hidden_size(model: nn.Module) -> int:
    """The width of the residual stream (what the input embeddings give each token)."""
    return model.get_input_embeddings().weight.shape[1]


@torch.no_grad()
def quantize_int8(model: nn.Module, tokenizer=None, calibration: str | None = CALIBRATION_TEXT,
                  keep: tuple[str, ...] = (), precise: tuple[str, ...] = PRECISE) -> nn.Module:
    """Quantize a float32 CPU model's Linear layers in place (see the module docstring); returns it.

    The base's fingerprint is computed first and kept, so artifacts made for the float32 weights
    load on their quantized view. With a tokenizer, one calibration pass over `calibration` finds
    the layers that read the same input, which then share one int8 product; without one (or
    calibration=None), one product per layer. Layers named in `keep` stay float32; those named in
    `precise` and those whose input is wider than the hidden state get two levels of input
    quantization. The int8 base is then compared with its float32 self (`_verify`), which raises
    QuantizationError where int8 arithmetic is broken on this machine."""
    from softprompt.core.geometry import model_fingerprint

    p = next(model.parameters())
    supported(p.device)
    if p.dtype != torch.float32:
        raise ValueError(f"int8 quantization starts from a float32 model, not {p.dtype}")
    if getattr(model, "softprompt_quantize", None):
        return model
    model_fingerprint(model)  # of the float32 weights: the identity artifacts are checked against
    groups: dict[int, list[nn.Module]] = {}  # id(a calibration input) -> the layers that read it, in order
    cfg = model.config
    limit = min(512, getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 512)
    if tokenizer is not None and calibration:
        ids = tokenizer(calibration, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :limit]
    else:  # random tokens: enough to compare the int8 base with its float32 self below
        V = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(3, V, (1, min(64, limit)), generator=torch.Generator().manual_seed(0))
    ids = ids.to(p.device)
    extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
    calibrate = tokenizer is not None and bool(calibration)
    if calibrate:
        _swap(model, lambda c: _Observer(c) if _quantizable(c) else None, keep)
    try:
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits  # float32's, (1, T, V)
    finally:
        if calibrate:
            def unwrap(c):
                if isinstance(c, _Observer):
                    if c.first_input is not None:
                        groups.setdefault(id(c.first_input), []).append(c.layer)
                    return c.layer
                return None
            _swap(model, unwrap)  # (the inputs go with the observers, after every id is taken)
    hidden = _hidden_size(model)
    two_levels = {id(m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in precise}
    two_levels |= {id(m) for m in model.modules() if _quantizable(m) and _weight(m).shape[1] > hidden}
    group_of = {id(m): g for g in groups.values() for m in g}  # id(layer) -> the layers reading its input
    shared: dict[int, tuple[Int8Product, int]] = {}  # id(layer) -> (its group's product, its index there)

    def make(c: nn.Module) -> nn.Module | None:
        if not _quantizable(c):
            return None
        if id(c) not in shared:
            # one product for the layers that read one input and are quantized alike
            members = [m for m in group_of.get(id(c), [c]) if (id(m) in two_levels) == (id(c) in two_levels)]
            prod = Int8Product(members, levels=2 if id(c) in two_levels else 1)
            shared.update({id(m): (prod, i) for i, m in enumerate(members)})
        prod, i = shared[id(c)]
        return Int8Linear(c, shared=prod, index=i)

    n = _swap(model, make, keep)
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no Linear layers to quantize")
    kernels.warm_up()
    model.softprompt_quantize = "int8"
    got = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
    model.softprompt_int8_error = _verify(got, want, type(model).__name__)
    return model
