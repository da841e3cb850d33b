"""Writing a file or a directory whole or not at all: the one place that does it (artifacts, PEFT
exports, store objects and exports, checkpoints). A reader sees the old content or the new, never
a half-written one; a crash leaves at most a hidden temp file beside the destination."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def fsync_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` and flush it to disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems cannot open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, tmp_dir: Path | None = None, durable: bool = True) -> None:
    """Replace `path` with `data` atomically: a temp file in `tmp_dir` (default: beside `path`; it must
    be on the same filesystem), renamed over it. `durable`: fsync the file and the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if durable:
        fsync_dir(path.parent)


@contextmanager
def staged_dir(path: Path):
    """Yield a fresh temp directory beside `path`; when the block ends without error it becomes
    `path` (an existing `path` is moved aside first and removed after, so a failure between the two
    renames keeps the old one). On error the temp directory is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "a")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
