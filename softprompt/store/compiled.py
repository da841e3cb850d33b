"""A task's serving form, kept in the store: its prefix compiled once per (artifact, base model).

    ROOT/compiled/<base fp>/ab/<artifact sha256>.<dtype>.safetensors   the prefix's `tensors()`: for a
                                                                        decoder one tensor "kv" (L, 2, H_kv, P, D)
    index table `compiled`: (artifact sha256, base fingerprint, dtype) -> sha256 of that file, shape, size

Why: serving a cold task used to mean reading and hashing the artifact, building the method module
and, for prompt tuning and P-tuning, a forward pass of the frozen model to compile the soft prompt.
All of that depends only on the artifact's bytes and the base weights, so it is done once and its
result stored; a later load (another process, a restart, an evicted task) is one read of one file.

Who compiles: whoever first has the artifact and the model together. `Store.add(..., model)` (an
in-memory prompt, a PEFT import, `softprompt store add --base`) and `softprompt store compile`
compile at publish time; a task published without a model is compiled on its first serve and the
result written into the store, so every later load anywhere is fast. A store the server cannot
write to still serves (from the in-memory compile), it only recompiles after a restart.

Trust: the compiled file is checked like every artifact, against the sha256 the index holds for it,
and so is the artifact it came from (a task whose artifact was altered is refused, as before),
but once per file version (inode, size, mtime) per process, not on every load: a later load costs
two stat calls. (A change that keeps inode, size and mtime, e.g. bit rot, is caught by the next
process or by `store verify`.) A compiled file that fails the check is never served: it is
recompiled from the artifact (itself checked against the index) and replaced; `Store.verify()`
reports it meanwhile. The key holds the artifact's hash and the base's fingerprint, so a new
version or another base never meets a stale prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from softprompt.core.geometry import model_fingerprint
from softprompt.families import family_of
from softprompt.io.artifact import ArtifactError
from softprompt.methods.base import Prefix

META_KEY = "softprompt_kv"
# safetensors dtype names of the dtypes a frozen model is served in
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

# Files already hashed by this process: path -> ((inode, size, mtime_ns), sha256). A file version
# seen before is trusted without rehashing; a replaced or rewritten file has a new version.
_verified: dict[str, tuple[tuple[int, int, int], str]] = {}
_verified_lock = threading.Lock()


class CompiledDamaged(ArtifactError):
    """A compiled file is missing, altered, or not what its index row says (it is recompiled)."""


def serving_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compiled_path(store, sha: str, fp: str, dtype: torch.dtype) -> Path:
    fp_dir = fp.replace(":", "-")  # "sha256:ab12..." is not a portable directory name
    return store.root / "compiled" / fp_dir / sha[:2] / f"{sha}.{_dtype_name(dtype)}.safetensors"


def _has_table(store) -> bool:
    return store._index.has_table("compiled")


def _seen(path: Path, version, sha: str) -> bool:
    with _verified_lock:
        return _verified.get(str(path)) == (version, sha)


def _remember(path: Path, version, sha: str) -> None:
    with _verified_lock:
        _verified[str(path)] = (version, sha)


def _version(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_artifact(entry) -> None:
    """Raise StoreError unless the entry's artifact matches the index; hashed once per file version."""
    try:
        version = _version(os.stat(entry.path))
    except FileNotFoundError:
        version = None
    if version is not None and _seen(entry.path, version, entry.sha256):
        return
    entry.verify()  # reads and hashes it; raises the store's own message on a missing or altered file
    if version is None:  # a remote store's local copy, fetched (and checked) just now
        version = _version(os.stat(entry.path))
    _remember(entry.path, version, entry.sha256)


def _row(store, sha: str, fp: str, dtype: torch.dtype) -> str | None:
    """The indexed sha256 of the compiled file for this key, or None (also for a store made before
    compiled forms existed: its table appears with the first compile)."""
    if not _has_table(store):
        return None
    r = store._db().execute("SELECT kv_sha256 FROM compiled WHERE sha256 = ? AND base_fingerprint = ? AND dtype = ?",
                   (sha, fp, _dtype_name(dtype))).fetchone()
    return r[0] if r else None


# --- reading: one read, no copy ------------------------------------------------------------------------

def read_tensors(path: Path, want_sha: str) -> dict[str, torch.Tensor]:
    """The tensors of a compiled file (a decoder's: "kv" (L, 2, H_kv, P, D); another family's prefix
    has its parts), hashed against `want_sha` unless this file version already was.

    The header is read, then each tensor's bytes straight into an uninitialized tensor of its shape
    (no zero-fill, no copy, no buffer left behind it), hashed there with the rest of the file if
    need be: every page of it is touched once by the read and once by the hash. (A memory map and a
    copy touched each page three times: map fault, hash, copy; on a machine where cold pages are
    slow to touch, that was most of a cold load.)"""
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise CompiledDamaged(f"compiled file {path} is missing") from None
    chunks, out = [], {}
    with f:
        st = os.fstat(f.fileno())  # of the file we read, not of whatever the path names a moment later
        version, size = _version(st), st.st_size
        head = f.read(8)
        if len(head) < 8:
            raise CompiledDamaged(f"compiled file {path} is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CompiledDamaged(f"compiled file {path} is truncated")
        header = f.read(n)
        chunks += [head, header]
        try:
            entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
            layout = sorted(((v["data_offsets"][0], v["data_offsets"][1], k, ST_DTYPES[v["dtype"]], v["shape"])
                             for k, v in entries.items()), key=lambda e: e[:2])
            if not layout:
                raise KeyError("no tensor")
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise CompiledDamaged(f"compiled file {path} has no readable tensors ({e})") from e
        at = 0  # bytes of the data section read so far
        for start, end, name, dtype, shape in layout:
            try:
                t = torch.empty(shape, dtype=dtype)
            except (TypeError, RuntimeError) as e:
                raise CompiledDamaged(f"compiled file {path}: tensor {name!r} has no readable shape ({e})") from e
            nbytes = t.numel() * t.element_size()
            if not at <= start <= end or end - start != nbytes or 8 + n + end > size:
                raise CompiledDamaged(f"compiled file {path}: the {name!r} tensor's offsets do not fit the file")
            gap = f.read(start - at)  # nothing in files we write; read (and hashed) all the same
            mv = memoryview(t.view(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
            got = 0
            while got < nbytes:  # one read for a regular file; a loop in case the kernel returns less
                k = f.readinto(mv[got:])
                if not k:
                    break
                got += k
            if got != nbytes or len(gap) != start - at:
                raise CompiledDamaged(f"compiled file {path} is truncated")
            chunks += [gap, mv]
            out[name], at = t, end
        chunks.append(f.read())
    if not _seen(path, version, want_sha):
        h = hashlib.sha256()
        for part in chunks:
            h.update(part)
        digest = h.hexdigest()
        if digest != want_sha:
            raise CompiledDamaged(f"compiled file {path} changed behind the index's back "
                                  f"(sha256 {digest[:12]}... != indexed {want_sha[:12]}...)")
        _remember(path, version, want_sha)
    return out


def read_kv(path: Path, want_sha: str) -> torch.Tensor:
    """The one KV tensor of a decoder's compiled file (see `read_tensors`)."""
    tensors = read_tensors(path, want_sha)
    if "kv" not in tensors:
        raise CompiledDamaged(f"compiled file {path} has no 'kv' tensor")
    return tensors["kv"]


# --- writing ------------------------------------------------------------------------------------------

def _ensure_table(store) -> None:
    if not getattr(store, "_compiled_table", False):
        schema = store._index.compiled_schema  # None where the index creates the table up front
        if schema:
            with store._write() as db:
                db.execute(schema)  # one statement: executescript would commit the open transaction
        store._compiled_table = True


def publish(store, sha: str, fp: str, prefix: Prefix) -> Path:
    """Write `prefix` (its `tensors()`) as the compiled form of artifact `sha` for base `fp`, atomically
    with its index row (file and row under the store's write lock, so concurrent compilers never
    leave them disagreeing)."""
    tensors = {k: t.detach().cpu().contiguous() for k, t in prefix.tensors().items()}
    dtype = next(iter(tensors.values())).dtype
    shapes = {k: list(t.shape) for k, t in tensors.items()}
    shape = shapes["kv"] if list(shapes) == ["kv"] else shapes  # a decoder's: its one shape, as ever
    meta = {"format": "softprompt-kv", "artifact_sha256": sha, "base_fingerprint": fp, "dtype": _dtype_name(dtype),
            "shape": shape}
    blob = st_save(tensors, metadata={META_KEY: json.dumps(meta)})
    path = compiled_path(store, sha, fp, dtype)
    _ensure_table(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    with store._write() as db:
        store._put(path, blob)
        db.execute("INSERT INTO compiled VALUES (?,?,?,?,?,?,?) ON CONFLICT (sha256, base_fingerprint, dtype) DO "
                   "UPDATE SET kv_sha256 = excluded.kv_sha256, shape = excluded.shape, size = excluded.size, "
                   "created = excluded.created",
                   (sha, fp, _dtype_name(dtype), hashlib.sha256(blob).hexdigest(), json.dumps(shape),
                    len(blob), time.time()))
    return path


def compile_entry(entry, model, *, allow_other_base: bool = False) -> Prefix:
    """Compile a store entry's prompt for `model` (the artifact checked against the index), on CPU."""
    prompt = entry.open(model, allow_other_base=allow_other_base)
    return prompt.to_kv_prefix(model).to(device="cpu", dtype=serving_dtype(model))


def load_or_compile(entry, model, *, allow_other_base: bool = False) -> Prefix:
    """The prefix of a store entry for `model`, on CPU in the model's dtype: read from the store's
    compiled form, or compiled now and written there for next time."""
    store, fp, dtype = entry.store, model_fingerprint(model), serving_dtype(model)
    want = _row(store, entry.sha256, fp, dtype)
    if want is not None:
        check_artifact(entry)  # the published artifact still holds: else the task is refused, as ever
        path = compiled_path(store, entry.sha256, fp, dtype)
        try:
            try:
                fetched = store._fetch(path, want)  # a remote store's local copy, checked against `want`
            except FileNotFoundError:
                fetched = False
            if not fetched:
                raise CompiledDamaged(f"compiled file {path} is missing or altered in the store")
            tensors = read_tensors(path, want)
            try:
                return family_of(model).load_prefix(tensors)
            except (KeyError, TypeError, ValueError) as e:
                raise CompiledDamaged(f"compiled file {path} does not hold this family's prefix ({e})") from e
        except CompiledDamaged:
            store.compiled_repairs += 1  # never served; recompiled from the checked artifact below
    prefix = compile_entry(entry, model, allow_other_base=allow_other_base)
    try:
        publish(store, entry.sha256, fp, prefix)
    except (OSError, *store.db_errors):  # a read-only store: serve this compile, recompile after a restart
        store.compiled_write_errors += 1
    return prefix


# --- keeping the store tidy -----------------------------------------------------------------------------

def collect(store, db, files: bool = False) -> list[Path]:
    """Remove compiled forms of artifacts no task row names any more; with `files`, also compiled files
    no row names (a writer killed between rename and commit). Caller holds the store's write lock."""
    if not _has_table(store):
        return []
    removed = []
    dead = db.execute("SELECT sha256, base_fingerprint, dtype FROM compiled "
                      "WHERE sha256 NOT IN (SELECT sha256 FROM tasks)").fetchall()
    for sha, fp, dtype in dead:
        db.execute("DELETE FROM compiled WHERE sha256 = ? AND base_fingerprint = ? AND dtype = ?", (sha, fp, dtype))
        p = compiled_path(store, sha, fp, getattr(torch, dtype))
        if store._remove(p):
            removed.append(p)
    if files:
        known = {compiled_path(store, sha, fp, getattr(torch, dt))
                 for sha, fp, dt in db.execute("SELECT sha256, base_fingerprint, dtype FROM compiled")}
        for p in store._list("compiled"):
            if p not in known:
                store._remove(p)
                removed.append(p)
    return removed


def verify(store) -> list[str]:
    """Problems with compiled files (each would be recompiled on its next load, never served)."""
    if not _has_table(store):
        return []
    problems = []
    for sha, fp, dtype, kv_sha in store._db().execute("SELECT sha256, base_fingerprint, dtype, kv_sha256 FROM compiled"):
        p = compiled_path(store, sha, fp, getattr(torch, dtype))
        blob = store._read_blob(p)  # the stored bytes (for a remote store, the object itself)
        if blob is None:
            problems.append(f"compiled {sha[:12]}... for {fp}: file {p} is missing")
        elif hashlib.sha256(blob).hexdigest() != kv_sha:
            problems.append(f"compiled {sha[:12]}... for {fp}: file {p} changed behind the index's back")
    return problems
