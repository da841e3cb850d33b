"""Where a frozen base runs and in what precision: one resolver for every loader and command.

    device    auto (CUDA when present, else the CPU), cpu, cuda, cuda:N, mps
    dtype     float32 (default), bfloat16, float16: the frozen base's weights and activations
    quantize  none, or int8 (CPU only; see softprompt/hf/quantize.py): the base's Linear layers

Prompts and prefixes are float32 in artifacts and while training; they are cast to the model's
dtype and device where they enter it (softprompt/hf, serving's prefix cache), never on disk.

The command line sets process-wide defaults once (`set_defaults`, from --device/--dtype/--quantize)
so that every loader below it, including the jobs that load a model themselves (train, eval, demo,
classify), picks them up without each threading three more arguments through. An explicit argument
to `load_base` always wins.

Threads: see `default_threads`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("none", "int8")


class DeviceError(ValueError):
    """A device, dtype or quantization that cannot run here; the message says what to use instead."""


@dataclass(frozen=True)
class Placement:
    """A resolved choice: a concrete torch device and dtype, and the quantization (None or 'int8')."""

    device: torch.device
    dtype: torch.dtype
    quantize: str | None = None


_defaults = {"device": "auto", "dtype": "float32", "quantize": "none"}


def set_defaults(device: str | None = None, dtype: str | None = None, quantize: str | None = None) -> None:
    """Process-wide defaults for loaders called without explicit arguments (the CLI's flags).
    Validated here, so a bad flag fails before any model is read."""
    new = {k: v for k, v in (("device", device), ("dtype", dtype), ("quantize", quantize)) if v is not None}
    resolve(**{**_defaults, **new})
    _defaults.update(new)


def defaults() -> dict:
    return dict(_defaults)


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """'auto' -> cuda if available, else cpu; 'cuda:N' checked against the devices present."""
    name = str(_defaults["device"] if name is None else name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA device here (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"--device {name}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}; use one of {', '.join(DEVICES)}")
    return dev


def resolve_dtype(name: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise DeviceError(f"unsupported dtype {name}; use one of {', '.join(DTYPES)}")
        return name
    name = str(_defaults["dtype"] if name is None else name).strip().lower().removeprefix("torch.")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve(device=None, dtype=None, quantize=None) -> Placement:
    """The one resolver: names (or None for the defaults) -> a Placement, refusing what cannot run."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    q = str(_defaults["quantize"] if quantize is None else quantize).strip().lower()
    if q not in QUANTIZE:
        raise DeviceError(f"unknown quantization {q!r}; use one of {', '.join(QUANTIZE)}")
    if q == "int8":
        # the int8 kernels (torch._int_mm with per-token activation scales) are CPU kernels here, and
        # the layers they replace compute in float32 around them
        if dev.type != "cpu":
            raise DeviceError(f"--quantize int8 runs on the CPU only, not on {dev}; on a GPU use --dtype bfloat16")
        if dt != torch.float32:
            raise DeviceError("--quantize int8 keeps the rest of the model in float32; drop --dtype "
                              f"{str(dt).removeprefix('torch.')}")
    return Placement(dev, dt, None if q == "none" else q)


# --------------------------------------------------------------------------------------------
# Threads


def default_threads() -> int:
    """Intra-op threads when none are asked for: the cores this process may use, less the ones
    other processes keep busy (the 1-minute load average, rounded down), at least 1.

    Why: torch starts one thread per core, and each small op of a decoding step then waits for its
    slowest thread; with other busy processes on the cores that thread is often descheduled, and two
    threads ran ~10x slower than one on a shared 2-core machine. On an idle machine this is every
    core (torch's own default). $OMP_NUM_THREADS, when set, wins (torch reads it at start).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0])
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, cores - busy)


def set_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads: `threads` > 0 as given, 0 for `default_threads()` (unless
    $OMP_NUM_THREADS is set, which torch already applied). Returns the number in use."""
    if threads < 0:
        raise DeviceError(f"threads must be >= 0, got {threads}")
    if threads == 0 and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    return torch.get_num_threads()


# Environments that make any x86 machine compute as an older one would (read by torch, oneDNN and MKL
# when they load): "avx2" shows a CPU with AVX2 alone (no AVX-512, no VNNI: int8 sums saturate
# there, see softprompt/core/int8_kernels.py), "default" torch's oldest ATen kernels. Used by the test
# suite (tests/test_every_isa.py) and bench/serve_quantized.py.
ISA_CAPS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
}


__all__ = ["DeviceError", "ISA_CAPS", "Placement", "default_threads", "defaults", "resolve", "resolve_device", "resolve_dtype",
           "set_defaults", "set_threads"]
