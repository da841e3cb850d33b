"""The int8 product's arithmetic: quantize each row, multiply, rescale.

`product(x, ...)` quantizes each row of x (one or two levels, see quantize.py), multiplies it by the
int8 weights and rescales the exact integer sums into each layer's float32 output.

Written as torch ops (`_math`, the reference), that is ~20 small kernels around one matmul, each
reading and writing a whole (M, K) or (M, N) tensor, each with its dispatch cost: for a prefill's
1920 rows the product took 2-5x its own matmul (the int8 base prefilled slower than float32, 4.2 s
against 3.6 s for 32 prompts of 60 tokens, one thread), and for a decode step's 32 rows ~170 us of
each ~230 us product went around the matmul. `int8_kernels.c` does the quantization in one pass over
each row and the rescaling (and the split into layers) in one more: the same IEEE operations in the
same order, compiled without fused multiply-adds or fast-math, so the very bits of `_math` (the
tests check it exactly), and a row's output still depends on that row alone.

It is compiled with the system's C compiler (`$CC`, else `cc`) on first use, into
`~/.cache/softprompt/kernels/` (`$SOFTPROMPT_CACHE/kernels/`), keyed by the source, the flags and the CPU, and loaded
with ctypes: no torch headers, a second to build. Where that fails (no compiler), a warning says so
once and `_math` runs: slower, the same results. `SOFTPROMPT_INT8_KERNELS=torch` chooses `_math`.
(Tried first: `torch.compile` of `_math`. It fused the prefill's passes as well, but its generated
kernels and call overhead cost as much as the torch ops for a decode step's 32 rows.)

The matmul: `torch._int_mm` hands the weights to oneDNN unpacked, and oneDNN reorders them into its
blocked layout at every call, which for a decode step's 32 rows costs more than the multiplication
(the step is bound by reading weights). `pack(w)` reorders a weight once
(`torch.ops.onednn.qlinear_prepack`, the kernel inductor's own x86 int8 path uses) and `int8_mm`
multiplies by the packed form with a scale of 1: the int32 sums come back as float32, exactly (they
are below 2^24 for K <= 1040, and rounded alike whatever the batch beyond). Against `_int_mm` with
30 layers' weights in turn, one thread: 32x576 by 576x3072 356 -> 222 us, 1920 rows 6.4 -> 3.0 ms. A
packing is checked against `_int_mm` on a sample, bit for bit, before it is used; where the op is
missing or differs (another torch), `_int_mm` it is.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict = {"lib": None, "failed": None}
SOURCE = Path(__file__).with_name("int8_kernels.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


def _torch_ops_only() -> bool:
    """`SOFTPROMPT_INT8_KERNELS=torch`: neither the C kernels nor packed weights, the torch ops alone."""
    return os.environ.get("SOFTPROMPT_INT8_KERNELS", "native") == "torch"


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

# w.data_ptr() -> (weakref to w, w._version when packed, its packed form, ones (N,), zeros (N,))
_packed: dict[int, tuple] = {}


def _onednn(q: torch.Tensor, packed: torch.Tensor, ones: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise.default(q, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                                      "none", [None], "")


def pack(w: torch.Tensor) -> bool:
    """Reorder int8 weight w (N, K) once into oneDNN's layout for `int8_mm`; False (and `_int_mm`
    for it) where that op is missing or does not give `_int_mm`'s exact result on a sample."""
    if w.device.type != "cpu" or _torch_ops_only():
        return False
    key = w.data_ptr()
    entry = _packed.get(key)
    if entry is not None and entry[0]() is w and entry[1] == w._version:
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
        _packed[key] = (weakref.ref(w, lambda _, k=key: _packed.pop(k, None)), w._version, packed, ones, zeros)
    return ok


def int8_mm(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """q (M, K) int8 @ w (N, K).T -> (M, N) float32, exact; through w's packed form where `pack`
    made one (looked up by address, and checked to be the same tensor's, unchanged since: a weight
    written in place, as by `load_state_dict`, is multiplied as it now is)."""
    entry = _packed.get(w.data_ptr())
    packed_w = entry[0]() if entry is not None else None
    if (packed_w is not None and packed_w.shape == w.shape and packed_w.stride() == w.stride()
            and packed_w._version == entry[1]):
        return _onednn(q, *entry[2:])
    return torch._int_mm(q, w.t()).float()


# ---- the native kernels ----------------------------------------------------------------------------


def _cpu_key() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    flags = FLAGS + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join([cc, *flags]).encode(), _cpu_key().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("SOFTPROMPT_CACHE") or Path.home() / ".cache" / "softprompt") / "kernels"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: this process builds its own copy
        cache = Path(tempfile.mkdtemp(prefix="softprompt-kernels-"))
    lib = cache / f"int8_kernels-{key}.so"
    if not lib.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
            os.replace(tmp, lib)  # whole or not at all: processes may build it at once
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = ctypes.CDLL(str(lib))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.sp_quantize.argtypes = [p, p, i64, i64, i32, p, p, p]
    dll.sp_rescale.argtypes = [p, p, p, p, i64, i64, i32, i64, p, p]
    dll.sp_quantize.restype = dll.sp_rescale.restype = None
    return dll


def _native():
    """The compiled kernels (built once per process, cached on disk), or None where they cannot be had."""
    if _state["lib"] is None and _state["failed"] is None:
        with _lock:
            if _state["lib"] is None and _state["failed"] is None:
                if _torch_ops_only():
                    _state["failed"] = "SOFTPROMPT_INT8_KERNELS=torch"
                else:
                    try:
                        _state["lib"] = _build()
                    except Exception as e:  # noqa: BLE001 - no compiler, a read-only home...: torch ops
                        _state["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        log.warning("int8 kernels could not be compiled (%s); running them as torch ops, slower",
                                    _state["failed"])
    return _state["lib"]


def native() -> bool:
    """Whether int8 products run through the compiled kernels in this process."""
    return _native() is not None


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def product(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, inv_smooth: torch.Tensor | None,
            bias: torch.Tensor | None, sizes: list[int], levels: int) -> list[torch.Tensor]:
    """As `_math`, through the compiled kernels where they can be had (see the module docstring)."""
    lib = _native()
    if (lib is None or x.requires_grad or x.shape[0] == 0 or x.dtype != torch.float32 or x.device.type != "cpu"
            or not all(_plain(t) for t in (w_scale, inv_smooth, bias))):
        return _math(x, w, w_scale, inv_smooth, bias, sizes, levels)  # what the C code does not take
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    # the C code trusts every length: checked before it reads anything
    if (w.shape[1] != K or sum(sizes) != N or len(w_scale) != N or (bias is not None and len(bias) != N)
            or (inv_smooth is not None and len(inv_smooth) != K)):
        raise ValueError(f"an int8 product of x {tuple(x.shape)} and w {tuple(w.shape)} split as {sizes}")
    q = torch.empty(levels * M, K, dtype=torch.int8)
    s = torch.empty(levels * M)
    work = torch.empty(K) if inv_smooth is not None else None
    lib.sp_quantize(x.data_ptr(), inv_smooth.data_ptr() if inv_smooth is not None else None, M, K, levels,
                    q.data_ptr(), s.data_ptr(), work.data_ptr() if work is not None else None)
    y = int8_mm(q, w)  # (levels * M, N) float32, contiguous
    outs = [torch.empty(M, n) for n in sizes]
    ptrs = (ctypes.c_void_p * len(outs))(*[o.data_ptr() for o in outs])
    lens = (ctypes.c_int64 * len(sizes))(*sizes)
    lib.sp_rescale(y.data_ptr(), s.data_ptr(), w_scale.data_ptr(), bias.data_ptr() if bias is not None else None,
                   M, N, levels, len(sizes), lens, ptrs)
    return outs


def warm_up() -> None:
    """Build (or load) the kernels now, in this thread, rather than in the first request's."""
    _native()
