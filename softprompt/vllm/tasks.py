"""Our tasks as vLLM sees them: placeholder token ids per task version, and the compiled prefix read
from the store with its checksum checked, with no import of transformers (nor of the rest of this
package: vLLM's environment pins its own transformers, see docs/vllm.md).

A request for a task starts with `P` placeholder ids, a function of the task's artifact sha256 alone
(so of the task's version: the store names every artifact by its content). vLLM's prefix cache hashes
blocks by their token ids, so a task's blocks are found again by the next request of the same task
and never by another task's (other ids) nor by a new version (another sha256). The ids are never
embedded: the connector writes their keys and values, so any id below the vocabulary size will do;
ids below `FIRST_ID` are skipped because tokenizers put their special tokens there.

    ROOT/index.sqlite   tasks (name, version, sha256, num_virtual_tokens, ...)
                        compiled (sha256, base_fingerprint, dtype, kv_sha256, shape, ...)
    ROOT/compiled/<fp with ':' as '-'>/<sha[:2]>/<sha>.<dtype>.safetensors   tensor "kv" (L, 2, H_kv, P, D)

(the layout written by softprompt/store/compiled.py; read here, never written.) A shared store's
PostgreSQL index (`postgresql://...?objects=DIR`) is read too, with psycopg, when its bytes live in
a directory every vLLM host mounts (objects in S3 are not read here).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from softprompt.core.placeholders import FIRST_ID, placeholder_ids  # noqa: F401 - re-exported


class TaskNotFound(LookupError):
    """No task (or no compiled prefix for this base and dtype) under that name."""


class PrefixDamaged(RuntimeError):
    """A compiled file is missing or does not match the sha256 its index row holds: never served."""


@dataclass(frozen=True)
class VllmTask:
    name: str
    version: int
    sha256: str  # the artifact's
    num_virtual_tokens: int
    kv_sha256: str  # the compiled file's, as indexed
    path: Path
    placeholders: tuple[int, ...]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def compiled_file(root: Path, sha256: str, base_fingerprint: str, dtype: str) -> Path:
    return root / "compiled" / base_fingerprint.replace(":", "-") / sha256[:2] / f"{sha256}.{dtype}.safetensors"


class TaskIndex:
    """The tasks of a store that have a compiled prefix for one base and dtype, keyed by their
    placeholder ids. `root`: a store directory (its SQLite index), or a `postgresql://` DSN whose
    objects are a directory (`?objects=DIR`, or the store's recorded setting). Re-read when the index
    changes (checked at most every `refresh_s`, or at once by `refresh`), so tasks published while
    vLLM runs are served without a restart."""

    QUERY = ("SELECT t.name, t.version, t.sha256, t.num_virtual_tokens, c.kv_sha256 FROM tasks t JOIN compiled c "
             "ON c.sha256 = t.sha256 WHERE c.base_fingerprint = {p} AND c.dtype = {p} AND t.num_virtual_tokens > 0")

    def __init__(self, root, base_fingerprint: str, dtype: str, vocab_size: int, refresh_s: float = 1.0):
        self.fp, self.dtype, self.vocab_size, self.refresh_s = base_fingerprint, dtype, vocab_size, refresh_s
        self._by_ids: dict[tuple[int, ...], VllmTask] = {}
        self._by_ref: dict[str, VllmTask] = {}
        self._lengths: list[int] = []
        self._stamp = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.dsn = None
        if str(root).startswith(("postgresql://", "postgres://")):
            self.dsn, self.root = _shared(str(root))
        else:
            self.root = Path(root)
            if not (self.root / "index.sqlite").is_file():
                raise FileNotFoundError(f"no softprompt store at {self.root} (index.sqlite is missing)")
        self._reload()

    def _file_stamp(self):
        if self.dsn is not None:  # what changes when a task or a compiled form is added or removed
            return _pg(self.dsn, "SELECT (SELECT value FROM meta WHERE key = 'generation'), count(*), max(created) "
                                 "FROM compiled")[0]
        # WAL mode: a commit may touch only the -wal file until a checkpoint
        out = []
        for suffix in ("", "-wal"):
            try:
                st = os.stat(self.root / f"index.sqlite{suffix}")
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def _rows(self) -> list[tuple]:
        if self.dsn is not None:
            return _pg(self.dsn, self.QUERY.format(p="%s"), (self.fp, self.dtype))
        db = sqlite3.connect(f"file:{self.root / 'index.sqlite'}?mode=ro", uri=True)
        try:
            has = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'compiled'").fetchone()
            return [] if not has else db.execute(self.QUERY.format(p="?"), (self.fp, self.dtype)).fetchall()
        finally:
            db.close()

    def _reload(self) -> None:
        by_ids, by_ref = {}, {}
        for name, version, sha, P, kv_sha in self._rows():
            ids = tuple(placeholder_ids(sha, P, self.vocab_size))
            task = VllmTask(name, version, sha, P, kv_sha, compiled_file(self.root, sha, self.fp, self.dtype), ids)
            by_ids[ids] = task
            by_ref[task.ref] = task
            prev = by_ref.get(name)
            if prev is None or prev.version < version:
                by_ref[name] = task  # a bare name: the newest version
        self._by_ids, self._by_ref = by_ids, by_ref
        self._lengths = sorted({len(k) for k in by_ids}, reverse=True)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.refresh_s:
            return
        self.refresh()

    def refresh(self) -> None:
        """Re-read the index now if its file changed (a request that names its task, see the
        connector, cannot wait for the next periodic check)."""
        with self._lock:
            self._checked = time.monotonic()
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                self._reload()

    def match(self, token_ids) -> VllmTask | None:
        """The task whose placeholders start `token_ids`, or None (a bare-model request)."""
        self._maybe_reload()
        head = tuple(token_ids[:max(self._lengths, default=0)])
        for P in self._lengths:
            task = self._by_ids.get(head[:P])
            if task is not None and len(token_ids) > P:  # at least one real token must follow
                return task
        return None

    def get(self, ref: str) -> VllmTask:
        """A task by "name" (its newest version with a compiled prefix) or "name@version"."""
        self._maybe_reload()
        task = self._by_ref.get(ref)
        if task is None:
            raise TaskNotFound(f"no task {ref!r} with a compiled prefix for base {self.fp} in {self.dtype} "
                               f"in the store at {self.root} (publish it with a model: softprompt store compile)")
        return task

    def tasks(self) -> list[VllmTask]:
        self._maybe_reload()
        return sorted(set(self._by_ids.values()), key=lambda t: (t.name, t.version))


def _pg(dsn: str, query: str, args=()) -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        return conn.execute(query, args).fetchall()


def _shared(url: str) -> tuple[str, Path]:
    """(the DSN without `objects`, the objects directory) of a shared store; ValueError where its
    bytes are not in a directory (S3 and the like are not read by the connector)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "objects"])))
    objects = next((v for k, v in reversed(query) if k == "objects"), None)
    if objects is None:
        found = _pg(dsn, "SELECT value FROM settings WHERE key = 'objects'")
        objects = found[0][0] if found else None
    if not objects or ("://" in objects and not objects.startswith("file://")):
        raise ValueError(f"the store's bytes are at {objects or '(not recorded)'}: the connector reads compiled "
                         "prefixes from a directory (a shared mount; ?objects=DIR), not from an object store")
    return dsn, Path(objects.removeprefix("file://"))


def read_prefix(task: VllmTask):
    """The task's compiled prefix, tensor "kv" (L, 2, H_kv, P, D), after checking the file's sha256
    against the index (a file altered behind the index's back is refused, never served)."""
    from safetensors.torch import load

    try:
        blob = task.path.read_bytes()
    except FileNotFoundError:
        raise PrefixDamaged(f"{task.ref}: compiled file {task.path} is missing") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != task.kv_sha256:
        raise PrefixDamaged(f"{task.ref}: compiled file {task.path} changed behind the index's back "
                            f"(sha256 {digest[:12]}... != indexed {task.kv_sha256[:12]}...)")
    tensors = load(blob)
    kv = tensors.get("kv")
    if kv is None or kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != task.num_virtual_tokens:
        raise PrefixDamaged(f"{task.ref}: compiled file {task.path} holds no decoder prefix "
                            f"(L, 2, H_kv, {task.num_virtual_tokens}, D)")
    return kv
