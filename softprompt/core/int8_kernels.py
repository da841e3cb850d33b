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
multiplies by the packed form with a scale of 1: the int32 sums come back as float32 (rounded once,
alike whatever the batch). Which inputs it takes exactly depends on the CPU: see `path()` below. A
packing is checked on a sample of the weight's extreme rows against the exact sums before it is used.
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
from dataclasses import dataclass
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


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """The unnormalized Walsh-Hadamard transform of each block of `block` values (a power of two) of
    the rows of x (M, K): stage h = 1, 2, 4, ...: (a, b) -> (a + b, a - b) for a, b h apart within
    each group of 2h. The C kernel computes the same sums in the same order (the same bits)."""
    M, K = x.shape
    for h in (2 ** i for i in range(block.bit_length() - 1)):
        v = x.reshape(M, K // (2 * h), 2, h)
        a, b = v[:, :, 0], v[:, :, 1]
        x = torch.stack([a + b, a - b], 2).reshape(M, K)
    return x


def _math(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block: int,
          bias: torch.Tensor | None, sizes: list[int], levels: int) -> list[torch.Tensor]:
    """x (M, K) float32; w (N, K) int8 with w_scale (N,); block: x's rows are rotated in blocks of
    this size first (1: not at all); bias (N,) or None; sizes: each layer's N_i (summing to N) ->
    [(M, N_i)] float32, contiguous."""
    p = path()
    if block > 1:
        x = rotate(x, block)
    M = x.shape[0]
    s = x.abs().amax(1, keepdim=True).clamp_(min=1e-12).div_(p.qmax)  # (M, 1): one scale per row
    q = (x / s).round_()
    if levels == 2:  # the rounding error, quantized in turn: 2 * qmax times finer, one matmul for both
        r = x - q * s
        s2 = r.abs().amax(1, keepdim=True).clamp_(min=1e-30).div_(p.qmax)  # (M, 1)
        y = int8_mm(_codes(torch.cat([q, (r / s2).round_()])), w)  # (2M, N): exact integers
        y = y[:M] * s + y[M:] * s2
    else:
        y = int8_mm(_codes(q), w) * s  # (M, N)
    y = y.mul_(w_scale)
    if bias is not None:
        y += bias
    return [p.contiguous() for p in y.split(sizes, 1)]


def _codes(q: torch.Tensor) -> torch.Tensor:
    """Integer-valued float q (M, K) in [-qmax, qmax] -> the bytes the matmul takes: q + offset as
    uint8 (the zero point oneDNN subtracts back), or int8 where the offset is 0."""
    off = path().offset
    return (q + off).to(torch.uint8) if off else q.to(torch.int8)


# ---- the matmul: codes (M, K) times w (N, K) int8 -> (M, N) float32, exact ----------------------------
#
# Which products are exact depends on the CPU, not only on torch. With VNNI (AVX512-VNNI, AVX-VNNI,
# AMX) a u8 x s8 product accumulates into int32 at once. Without it (AVX2 alone, AVX-512 without
# VNNI), oneDNN multiplies pairs of u8 x s8 into int16 with saturation (vpmaddubsw): a pair sums to at
# most 2 * 255 * 127 = 64770 > 32767, and an int8 (s8) input is first shifted by +128 into u8, so
# `torch._int_mm` and an s8 input to the packed op overflow on their own. Measured on an AVX-512 VNNI
# machine capped with ONEDNN_MAX_CPU_ISA=AVX2: sums off by up to 1.2e7, the int8 model's logits off
# by ~1 (the prefix self-check failed on it, with the wrong cause). With inputs of 7 bits (|v| <= 63,
# u8 = v + 64 <= 127) a pair stays below 2 * 127 * 127 = 32258: exact on every x86 CPU. And on the
# AVX-512 VNNI machine without AMX (AMD Zen 4) oneDNN's s8-input path took 0.67 s for one (32 x 576)
# by (576 x 1536) product, its u8 path 245 us: u8 inputs it is, with the zero point, everywhere.
#
# So `path()` probes, once per process, which of these gives exact sums on extreme inputs, in order:
# oneDNN u8 with 8-bit inputs, the same with 7-bit inputs, `torch._int_mm` (8-bit), and a float
# matmul of the integers (exact: float32 where every sum stays below 2^24, float64 beyond).


@dataclass(frozen=True)
class MatmulPath:
    """How this process multiplies int8: `matmul` (onednn, int_mm or float), `qmax` (the inputs'
    largest code: 127 for 8 bits, 63 for 7), `offset` (added to make the codes uint8; 0 for int8)."""

    matmul: str
    qmax: int
    offset: int

    @property
    def bits(self) -> int:
        return 8 if self.qmax == 127 else 7


_path: dict = {}


def _onednn(q: torch.Tensor, offset: int, packed: torch.Tensor, ones: torch.Tensor,
            zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise.default(q, 1.0, offset, packed, ones, zeros, None, 1.0, 0,
                                                      torch.float32, "none", [None], "")


def _exact(codes: torch.Tensor, offset: int, w: torch.Tensor) -> torch.Tensor:
    """The reference: the integer sums through a float matmul, exact (|sum| <= K * 255 * 127)."""
    v = codes.to(torch.int32) - offset if offset else codes.to(torch.int32)
    K = w.shape[1]
    dt = torch.float32 if K * 255 * 127 < 2 ** 24 else torch.float64
    return (v.to(dt) @ w.to(dt).t()).float()


def _extremes(qmax: int, N: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (N, K) of +-127 and inputs (8, K) that make every pair of products as large as it can
    be: equal or opposite signs to a weight row, all +-qmax, and random codes besides."""
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    w[:4] = torch.where(torch.rand(4, K, generator=g) < 0.5, -127, 127).to(torch.int8)
    x = torch.randint(-qmax, qmax + 1, (8, K), generator=g)
    x[0], x[1] = w[0].sign() * qmax, -w[1].sign() * qmax
    x[2], x[3] = qmax, -qmax
    return x, w


def _probe() -> MatmulPath:
    """The first matmul that gives exact sums on extreme inputs here (see above)."""
    g = torch.Generator().manual_seed(0)
    N, K = 48, 256
    if not _torch_ops_only():
        for qmax in (127, 63):
            x, w = _extremes(qmax, N, K, g)
            try:
                packed = torch.ops.onednn.qlinear_prepack(w, [8, K])
                got = _onednn((x + qmax + 1).to(torch.uint8), qmax + 1, packed, torch.ones(N),
                              torch.zeros(N, dtype=torch.long))
            except Exception as e:  # noqa: BLE001 - an op this torch lacks or refuses
                log.info("oneDNN packed int8 weights unavailable (%s)", e)
                break
            if torch.equal(got, _exact(x, 0, w)):
                return MatmulPath("onednn", qmax, qmax + 1)
    x, w = _extremes(127, N, K, g)
    try:
        if torch.equal(torch._int_mm(x.to(torch.int8), w.t()).float(), _exact(x, 0, w)):
            return MatmulPath("int_mm", 127, 0)
    except Exception as e:  # noqa: BLE001
        log.info("torch._int_mm unavailable (%s)", e)
    return MatmulPath("float", 127, 0)


def path() -> MatmulPath:
    """This process's int8 matmul (probed once; `SOFTPROMPT_INT8_KERNELS=torch` leaves oneDNN out)."""
    key = _torch_ops_only()
    if key not in _path:
        with _lock:
            if key not in _path:
                _path[key] = _probe()
    return _path[key]


# w.data_ptr() -> (weakref to w, w._version when packed, its packed form, ones (N,), zeros (N,))
_packed: dict[int, tuple] = {}


def pack(w: torch.Tensor) -> bool:
    """Reorder int8 weight w (N, K) once into oneDNN's layout for `int8_mm`, where this process
    multiplies through oneDNN; False (and the exact float matmul for it) where the op refuses it or
    does not give the exact sums on a sample that includes the weight's extreme rows."""
    p = path()
    if w.device.type != "cpu" or p.matmul != "onednn":
        return False
    key = w.data_ptr()
    entry = _packed.get(key)
    if entry is not None and entry[0]() is w and entry[1] == w._version:
        return True
    N, K = w.shape
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, [32, K])
        ones, zeros = torch.ones(N), torch.zeros(N, dtype=torch.long)
        g = torch.Generator().manual_seed(0)
        sample = torch.randint(-p.qmax, p.qmax + 1, (7, K), generator=g)
        big = w.abs().int().sum(1).argmax()  # the weight row with the largest sums
        sample[0], sample[1] = w[big].sign() * p.qmax, p.qmax
        codes = (sample + p.offset).to(torch.uint8)
        ok = torch.equal(_onednn(codes, p.offset, packed, ones, zeros), _exact(codes, p.offset, w))
    except Exception as e:  # noqa: BLE001 - an op this torch lacks or refuses: the float matmul does the same
        log.info("oneDNN packed int8 weights unavailable (%s): a float matmul it is", e)
        return False
    if ok:
        _packed[key] = (weakref.ref(w, lambda _, k=key: _packed.pop(k, None)), w._version, packed, ones, zeros)
    else:
        log.warning("oneDNN's packed int8 product is not exact for a weight of shape %s here: a float matmul "
                    "it is, slower", tuple(w.shape))
    return ok


def int8_mm(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Codes q (M, K) (`_codes`) @ w (N, K).T -> (M, N) float32, the exact integer sums; through w's
    packed form where `pack` made one (looked up by address, and checked to be the same tensor's,
    unchanged since: a weight written in place, as by `load_state_dict`, is multiplied as it now is)."""
    p = path()
    entry = _packed.get(w.data_ptr())
    packed_w = entry[0]() if entry is not None else None
    if (packed_w is not None and packed_w.shape == w.shape and packed_w.stride() == w.stride()
            and packed_w._version == entry[1]):
        return _onednn(q, p.offset, *entry[2:])
    if p.matmul == "int_mm":
        return torch._int_mm(q, w.t()).float()
    return _exact(q, p.offset, w)


# ---- the native kernels ----------------------------------------------------------------------------


def _cpu_key() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


# the CPU features that decide which kernels run (as /proc/cpuinfo names them)
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_features() -> list[str]:
    """Which of FEATURES this CPU has (empty where /proc/cpuinfo cannot be read)."""
    flags = set(_cpu_key().split())
    return [f for f in FEATURES if f in flags]


def describe() -> str:
    """One line: the CPU, the ISA torch and oneDNN run at here, and the int8 path this process takes
    (for `softprompt info` and for every error that int8 arithmetic could cause)."""
    p = path()
    caps = ", ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
                    if os.environ.get(k))
    matmul = {"onednn": "oneDNN packed u8 x s8", "int_mm": "torch._int_mm", "float": "a float matmul (slow)"}[p.matmul]
    kernels = "C kernels" if native() else f"torch ops ({_state['failed']})"
    return (f"CPU {' '.join(cpu_features()) or platform.machine()}; torch ISA {torch.backends.cpu.get_cpu_capability()}"
            f"{f' ({caps})' if caps else ''}; int8: {matmul}, {p.bits}-bit inputs, {kernels}")


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
    dll.sp_quantize.argtypes = [p, i64, i64, i64, i32, ctypes.c_float, i32, p, p, p]
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


def product(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block: int,
            bias: torch.Tensor | None, sizes: list[int], levels: int) -> list[torch.Tensor]:
    """As `_math`, through the compiled kernels where they can be had (see the module docstring)."""
    lib = _native()
    if (lib is None or x.requires_grad or x.shape[0] == 0 or x.dtype != torch.float32 or x.device.type != "cpu"
            or not all(_plain(t) for t in (w_scale, bias))):
        return _math(x, w, w_scale, block, bias, sizes, levels)  # what the C code does not take
    x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    # the C code trusts every length: checked before it reads anything
    if (w.shape[1] != K or sum(sizes) != N or len(w_scale) != N or (bias is not None and len(bias) != N)
            or block < 1 or block & (block - 1) or K % block):
        raise ValueError(f"an int8 product of x {tuple(x.shape)} and w {tuple(w.shape)} split as {sizes}, "
                         f"rotated in blocks of {block}")
    p = path()
    q = torch.empty(levels * M, K, dtype=torch.uint8 if p.offset else torch.int8)
    s = torch.empty(levels * M)
    work = torch.empty(K)
    lib.sp_quantize(x.data_ptr(), block, M, K, levels, float(p.qmax), p.offset, q.data_ptr(), s.data_ptr(),
                    work.data_ptr())
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
