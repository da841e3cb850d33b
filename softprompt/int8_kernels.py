"""The int8 product's arithmetic, and its fused form.

`product(x, ...)` quantizes each row of x (one or two levels, see quantize.py), multiplies it by the
int8 weights with `torch._int_mm` and rescales the int32 result into each layer's float32 output.
Written as plain torch ops, that is ~20 small kernels around one matmul, and each of them reads and
writes a whole (M, K) or (M, N) tensor: for a prefill's 1920 rows the int8 product took 2-5x the
time of its own matmul, and the int8 base prefilled slower than the float32 one (4.2 s against 3.6 s
for 32 prompts of 60 tokens, one thread). `torch.compile` (inductor's C++ backend, from the same
function) fuses them into a few loops: one pass to quantize, one to rescale and split.

The fused form computes the very same bits as the eager one (the tests check it exactly): every
step is elementwise or a max over a row, whose result does not depend on the order of reduction,
so a row's output still depends on that row alone, whatever the batch.

Compiled once per process and shape of product (levels, number of layers sharing it), for any
number of rows (dynamic shapes), when the int8 base is made (`warm_up`), so no request pays for it
and no serving thread compiles. Where compiling fails (no C++ compiler, an inductor error), a
warning says so once and the eager form runs: slower, the same results.
`SOFTPROMPT_INT8_KERNELS=eager` skips compiling.

The matmul itself: `torch._int_mm` hands the weights to oneDNN unpacked, and oneDNN reorders them
into its own blocked layout at every call, which for a decode step's 32 rows costs more than the
multiplication (the step is bound by reading weights). `pack(w)` reorders a weight once
(`torch.ops.onednn.qlinear_prepack`, the kernel inductor's own x86 int8 path uses) and `int8_mm`
multiplies by the packed form, with a scale of 1: the int32 sums come back as float32, exactly (they
are below 2^24 for K <= 1040, and rounded alike whatever the batch beyond). Measured against
`_int_mm` with 30 layers' weights in turn, one thread: 32x576 by 576x3072 356 -> 222 us, a
prefill's 1920 rows 6.4 -> 3.0 ms. A packing is checked against `_int_mm` on a sample, bit for
bit, before it is used; where the op is missing or differs (another torch), `_int_mm` it is.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref

import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict = {"compiled": None, "failed": None}


def _math(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, inv_smooth: torch.Tensor | None,
          bias: torch.Tensor | None, sizes: list[int], levels: int) -> list[torch.Tensor]:
    """x (M, K) float32; w (N, K) int8 with w_scale (N,); inv_smooth (K,) or None; bias (N,) or None;
    sizes: each layer's N_i (summing to N) -> [(M, N_i)] float32, contiguous."""
    if inv_smooth is not None:
        x = x * inv_smooth
    M = x.shape[0]
    s = x.abs().amax(1, keepdim=True).clamp_(min=1e-12).div_(127)  # (M, 1): one scale per row
    q = (x / s).round_()
    if levels == 2:  # the rounding error, quantized in turn: 254x finer, one matmul for both
        r = x - q * s
        s2 = r.abs().amax(1, keepdim=True).clamp_(min=1e-30).div_(127)  # (M, 1)
        y = int8_mm(torch.cat([q, (r / s2).round_()]).to(torch.int8), w)  # (2M, N): exact integers
        y = y[:M] * s + y[M:] * s2
    else:
        y = int8_mm(q.to(torch.int8), w) * s  # (M, N)
    y = y.mul_(w_scale)
    if bias is not None:
        y += bias
    return [p.contiguous() for p in y.split(sizes, 1)]


# ---- the matmul: q (M, K) int8 times w (N, K) int8 -> (M, N) float32, exact ----------------------------

_packed: dict[int, tuple] = {}  # w.data_ptr() -> (weakref to w, its packed form, ones (N,), zeros (N,))


def _onednn(q: torch.Tensor, packed: torch.Tensor, ones: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise.default(q, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                                      "none", [None], "")


def pack(w: torch.Tensor) -> bool:
    """Reorder int8 weight w (N, K) once into oneDNN's layout for `int8_mm`; False (and `_int_mm`
    for it) where that op is missing or does not give `_int_mm`'s exact result on a sample."""
    if w.device.type != "cpu" or os.environ.get("SOFTPROMPT_INT8_KERNELS", "compiled") == "eager":
        return False
    key = w.data_ptr()
    entry = _packed.get(key)
    if entry is not None and entry[0]() is w:
        return True
    N, K = w.shape
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, [32, K])
        ones, zeros = torch.ones(N), torch.zeros(N, dtype=torch.long)
        sample = torch.randint(-127, 128, (7, K), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
        sample[0] = 127  # the largest sums
        ok = torch.equal(_onednn(sample, packed, ones, zeros), torch._int_mm(sample, w.t()).float())
    except Exception as e:  # noqa: BLE001 - an op this torch lacks or refuses: _int_mm does the same
        log.info("oneDNN packed int8 weights unavailable (%s): torch._int_mm it is", e)
        return False
    if ok:
        _packed[key] = (weakref.ref(w, lambda _, k=key: _packed.pop(k, None)), packed, ones, zeros)
    return ok


def _int8_mm(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    entry = _packed.get(w.data_ptr())
    packed_w = entry[0]() if entry is not None else None
    if packed_w is not None and packed_w.shape == w.shape and packed_w.stride() == w.stride():
        return _onednn(q, *entry[1:])
    return torch._int_mm(q, w.t()).float()


# An op of our own (a plain library op: torch.library.custom_op's wrapper cost ~25 us a call, 3 us
# this way), so the compiled graph calls it as one opaque kernel: a packed oneDNN tensor cannot be
# a graph input, so it is looked up by the weight's address (checked against the weight itself).
_lib = torch.library.Library("softprompt", "DEF")
_lib.define("int8_mm(Tensor q, Tensor w) -> Tensor")
_lib.impl("int8_mm", _int8_mm, "CPU")


@torch.library.register_fake("softprompt::int8_mm")
def _(q, w):
    return q.new_empty(q.shape[0], w.shape[0], dtype=torch.float32)


def int8_mm(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """q (M, K) int8 @ w (N, K).T -> (M, N) float32, exact; through w's packed form where `pack`
    made one."""
    return torch.ops.softprompt.int8_mm.default(q, w)


def _fused(*args) -> list[torch.Tensor]:
    """What is compiled: a frame of its own, so that calling `_math` itself never runs compiled code
    (dynamo keeps compiled code on the compiled function's code object)."""
    return _math(*args)


@functools.lru_cache(maxsize=64)
def _filler(n: int, value: float, device: str) -> torch.Tensor:
    return torch.full((n,), value, device=device)


def _compiled():
    """The fused form (compiled lazily, once per process), or None where it cannot be had."""
    if _state["compiled"] is None and _state["failed"] is None:
        with _lock:
            if _state["compiled"] is None and _state["failed"] is None:
                if os.environ.get("SOFTPROMPT_INT8_KERNELS", "compiled") == "eager":
                    _state["failed"] = "SOFTPROMPT_INT8_KERNELS=eager"
                else:
                    _state["compiled"] = torch.compile(_fused, dynamic=True)
    return _state["compiled"]


def fused() -> bool:
    """Whether int8 products run fused (compiled) in this process."""
    return _compiled() is not None and _state["failed"] is None


def product(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, inv_smooth: torch.Tensor | None,
            bias: torch.Tensor | None, sizes: list[int], levels: int) -> list[torch.Tensor]:
    """As `_math`, fused where it can be (see the module docstring)."""
    fn = _compiled() if _state["failed"] is None else None
    if fn is None or x.requires_grad or x.shape[0] == 0 or x.device.type != "cpu":
        return _math(x, w, w_scale, inv_smooth, bias, sizes, levels)
    M, K = x.shape
    # the same graph for every product of this shape: no smoothing is smoothing by 1, no bias is 0
    # (both exact), so a model compiles one graph per (levels, layers sharing the input)
    smooth = inv_smooth if inv_smooth is not None else _filler(K, 1.0, str(x.device))
    shift = bias if bias is not None else _filler(w.shape[0], 0.0, str(x.device))
    # one row would get a graph of its own (dynamo specializes sizes of 1): two copies of it instead;
    # a view would too (its base is guarded on): `detach` gives the same storage with no base
    xx = torch.cat([x, x]) if M == 1 else x.contiguous().detach()
    try:
        with torch.no_grad():
            out = fn(xx, w, w_scale, smooth, shift, list(sizes), levels)
    except Exception as e:  # noqa: BLE001 - any failure to compile: the eager form computes the same
        with _lock:
            if _state["failed"] is None:
                _state["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("int8 kernels could not be compiled (%s); running them unfused, slower",
                            _state["failed"])
        return _math(x, w, w_scale, inv_smooth, bias, sizes, levels)
    return [p[:1] for p in out] if M == 1 else out


def warm_up(products) -> None:
    """Compile the fused form for each shape of product in `products` (Int8Products) now, in this
    thread, on two rows: any number of rows then runs without compiling again."""
    seen = set()
    for p in products:
        key = (p.levels, len(p.sizes))
        if key in seen or _compiled() is None or _state["failed"] is not None:
            continue
        seen.add(key)
        with torch.no_grad():
            p.parts(torch.zeros(2, p.weight_int8.shape[1], device=p.weight_int8.device))
