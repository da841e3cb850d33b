"""Training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

    OUT/checkpoints/step-000100/
        tensors.safetensors   trainable parameters (and buffers), optimizer state, RNG state (uint8)
        state.json            step, data position, optimizer hyperparameters, Python RNG, early
                              stopping state, and the sha256 of tensors.safetensors

A checkpoint is written into a hidden temporary directory, every file flushed and fsynced, then
renamed into place: a process killed at any moment (SIGKILL included) leaves either the complete
new checkpoint or none, and the previous good one stays. Loading checks the checksum and falls
back to the newest checkpoint that verifies. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from softprompt.core.atomic import fsync_dir as _fsync_dir
from softprompt.core.atomic import fsync_write as _fsync

TENSORS, STATE = "tensors.safetensors", "state.json"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    pass


def save_checkpoint(root: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    state = dict(state, step=step, tensors_sha256=hashlib.sha256(blob).hexdigest(), saved=time.time())
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", suffix=".tmp", dir=root))
    try:
        _fsync(tmp / TENSORS, blob)
        if os.environ.get("SOFTPROMPT_TEST_CHECKPOINT_STOP") == str(step):  # a test kills us mid-write:
            os.kill(os.getpid(), signal.SIGSTOP)  # it waits for this stop (no timing window), then kills
        _fsync(tmp / STATE, json.dumps(state, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():  # same step written again (a resumed run): swap it out
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for junk in root.glob(".step-*.tmp"):  # left by a killed writer
        shutil.rmtree(junk, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of one checkpoint directory, verified by checksum."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        blob = (path / TENSORS).read_bytes()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from e
    if hashlib.sha256(blob).hexdigest() != state.get("tensors_sha256"):
        raise CheckpointError(f"{path}: {TENSORS} does not match its checksum (truncated or altered)")
    return st_load(blob), state


def latest_checkpoint(root: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint under `root` that verifies, or None."""
    for path in reversed(list_checkpoints(root)):
        try:
            tensors, state = load_checkpoint(path)
        except CheckpointError:
            continue
        return path, tensors, state
    return None


# --------------------------------------------------------------------------------------------
# Optimizer and RNG state <-> (tensors, JSON)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = v
            else:
                scalars[f"{idx}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict]:
    import random

    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def rng_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    import random

    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
