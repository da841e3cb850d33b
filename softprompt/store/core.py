"""The prompt store: thousands of tasks as content-named artifact files plus a SQLite index.

    ROOT/index.sqlite                     one row per (name, version): method, base fingerprint, size,
                                          sha256 of the file, metrics, tags, creation time (WAL mode)
    ROOT/objects/ab/<sha256>.safetensors  the single-file artifact (card inside), named by its sha256
    ROOT/files/<sha256>.png|.json         files a card names (training plot, inspection), copied in on
                                          add, so the server never reads a card's path outside the store
    ROOT/tmp/                             files being written; only ever complete files leave it

Why it stays consistent when a writer dies at any instant: an add takes SQLite's write lock
(`BEGIN IMMEDIATE`), writes the file to tmp/, fsyncs it, renames it into objects/, and only then
inserts the row and commits. A kill before the commit rolls the transaction back and leaves at
most an orphan file (never a row without its file); `gc()` removes orphans. Because temp files are
only written under the write lock, `gc()`, holding that lock, knows every temp file is dead.
Readers never block on the writer (WAL) and only see a row once its file is complete.

Beside each artifact the store keeps its serving form, the KV prefix compiled for a base model
(ROOT/compiled/, see softprompt/store/compiled.py): `StoreEntry.kv_prefix(model)` reads it with no
forward pass, compiling and storing it on first use; `add(..., model)` compiles at publish time.

Many machines, one store (docs/distributed.md): `Store("postgresql://...")` keeps the index in
PostgreSQL and the bytes under an fsspec URL (a shared directory or `s3://bucket/prefix`), named in
the DSN (`?objects=URL`), by $SOFTPROMPT_OBJECTS, or recorded in the index by its first user. The
same logic runs over either index (softprompt/store/backends/): PostgreSQL writers serialize on an
advisory lock where SQLite's take its write lock, and an object store's PUT is atomic where a local
file is renamed into place. Remote bytes are read through a local content-addressed cache.

Governance (docs/store.md#approvals): each version is a draft until `approve`d (or `revoke`d), a
log of decisions optionally signed over the artifact's checksums (store/approvals.py); servers
append what they served to the `trail` table (store/trail.py). And only artifacts that load get
in: `add` and `verify` check tensors against their header, card and geometry (store/checks.py).

Why files are checked against the index: a file replaced behind the index's back (a manual copy,
disk damage) would otherwise load as a different task under the same name; `open()` compares the
file's sha256 with the index's and refuses with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from softprompt.core.atomic import fsync_write, staged_dir, write_file
from softprompt.core.geometry import model_fingerprint
from softprompt.io.artifact import (
    CARD_FILE,
    META_KEY,
    TENSOR_FILE,
    ArtifactError,
    check_card,
    data_section,
    load_artifact,
    make_card,
    read_raw,
)
from softprompt.io.card_schema import card_file_path
from softprompt.methods import PromptMethod
from softprompt.store import approvals, checks, compiled, trail
from softprompt.store.backends import LocalBlobs, SQLiteIndex, is_database_url
from softprompt.store.backends.blobs import write_atomic

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_VERSION = 2**63 - 1  # SQLite's INTEGER: a larger number is no version, not an OverflowError
MAX_ATTACHMENT_BYTES = 16 << 20  # a plot or an inspection summary is far smaller
COLUMNS = ("name", "version", "method", "num_virtual_tokens", "base_fingerprint", "base_name", "size", "sha256",
           "metrics", "tags", "created")


class StoreError(ArtifactError):
    """A store operation is refused; the message says why and what to do. An ArtifactError, so the
    CLI and the serving engine (which maps ArtifactError to a refused task) report it as such."""


class DuplicateArtifact(StoreError):
    """The latest version of the task already holds these tensors (HTTP: 409)."""


class NoSuchTask(StoreError):
    """The store has no such task or version (as unknown as a name never added)."""


class StoreUnavailable(StoreError):
    """The store's index (its database server) cannot be reached; retry when it is back."""


@dataclass(frozen=True)
class TaskRef:
    name: str
    version: int

    def __str__(self):
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class StoreEntry:
    """One resolved task version, for a TaskRegistry fallback: `open(model)` loads it (checking the
    file against the index's sha256), and `str()` is its content-named path, so a cache keyed by it
    sees a new version as a new key and never serves a stale prefix."""

    store: "Store"
    name: str
    version: int
    sha256: str
    path: Path

    def open(self, model, *, allow_other_base: bool = False) -> PromptMethod:
        return self.store._load(self, model, allow_other_base)

    def kv_prefix(self, model, *, allow_other_base: bool = False):
        """The task's `Prefix` for `model` (a decoder's: the KV prefix `(L, 2, H_kv, P, D)`), on CPU in
        the model's dtype, from the store's compiled form (one read of one file), compiled and stored
        first if there is none."""
        from softprompt.store.compiled import load_or_compile

        return load_or_compile(self, model, allow_other_base=allow_other_base)

    def verify(self) -> None:
        """Raise StoreError unless the file is there and matches the index's sha256 (`open` does this
        too; other loaders of the file, e.g. classifiers, call it first)."""
        self.store._check_file(self)

    def __str__(self):
        return str(self.path)


def _checked(e: StoreEntry, read, where: str, changed: str) -> bytes:
    """The bytes `read()` gives for entry `e`'s file (named `where` in messages), refused with the
    store's message when they are missing or not what the index holds."""
    try:
        blob = read()
    except FileNotFoundError:
        raise StoreError(f"task {e.name}@{e.version}: its file {where} is missing (removed behind the "
                         "index's back, or by a concurrent rm); re-add the task") from None
    digest = _sha(blob)
    if digest != e.sha256:
        raise StoreError(f"task {e.name}@{e.version}: the store file {where} {changed} behind the index's back "
                         f"(sha256 {digest[:12]}... != indexed {e.sha256[:12]}...); refusing it: restore the file "
                         "or `softprompt store rm` and re-add the task")
    return blob


def default_root() -> Path:
    return Path(os.environ.get("SOFTPROMPT_STORE") or Path.home() / ".cache" / "softprompt" / "store")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError(f"bad task name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit (e.g. e2e-prefix.v2)")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'name' -> (name, None: the latest); 'name@3' -> (name, 3)."""
    name, at, version = str(ref).partition("@")
    check_name(name)
    if not at:
        return name, None
    if not (version.isascii() and version.isdigit()) or not 1 <= int(version) <= MAX_VERSION:
        raise StoreError(f"bad version in {ref!r}: write NAME@N with N a positive integer below 2**63, "
                         "or NAME for the latest")
    return name, int(version)


def _split_objects(dsn: str) -> tuple[str, str | None]:
    """'postgresql://h/db?objects=s3://b/p&sslmode=x' -> ('postgresql://h/db?sslmode=x', 's3://b/p')."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(dsn)
    query = parse_qsl(parts.query, keep_blank_values=True)
    objects = [v for k, v in query if k == "objects"]
    rest = urlencode([(k, v) for k, v in query if k != "objects"])
    return urlunsplit(parts._replace(query=rest)), (objects[-1] if objects else None)


def _cache_dir(objects: str) -> Path:
    base = os.environ.get("SOFTPROMPT_CACHE") or Path.home() / ".cache" / "softprompt"
    return Path(base) / "blobs" / hashlib.sha256(objects.encode()).hexdigest()[:16]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """A directory of artifacts and their index; safe for many reading processes and threads while
    one or more processes write (writes serialize on SQLite's lock)."""

    compiled_repairs = 0  # compiled files found damaged and recompiled (never served)
    compiled_write_errors = 0  # compiles that could not be stored (a read-only store), served anyway

    def __init__(self, root: str | os.PathLike | None = None, objects: str | None = None):
        """`root`: a directory (SQLite index + files in it, the default) or a `postgresql://` DSN;
        `objects`: for a DSN, where the bytes live (a directory or an fsspec URL such as s3://b/p)."""
        if root is None and is_database_url(os.environ.get("SOFTPROMPT_STORE")):
            root = os.environ["SOFTPROMPT_STORE"]
        if is_database_url(root):
            self._open_shared(root, objects)
        else:
            self.root = Path(root) if root is not None else default_root()
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"{self.root} is a file, not a prompt store directory; give a directory (--store DIR)")
            self._make_dirs()
            try:
                self._index = SQLiteIndex(self.root / "index.sqlite")
            except sqlite3.Error as e:
                raise StoreError(f"{self.root / 'index.sqlite'} is not a usable store index ({e}); "
                                 "point --store at a prompt store directory") from None
            self._blobs = LocalBlobs(self.root)
        self.where = self._index.where  # for messages: the index's location (a DSN without its password)
        self.db_errors = self._index.errors  # what a failing index raises

    def _open_shared(self, dsn: str, objects: str | None) -> None:
        from softprompt.store.backends import FsspecBlobs
        from softprompt.store.backends.postgres import PostgresIndex

        dsn, in_dsn = _split_objects(dsn)
        try:
            self._index = PostgresIndex(dsn)
        except ConnectionError as e:
            raise StoreUnavailable(str(e)) from None
        recorded = self._index.setting("objects")
        objects = objects or in_dsn or os.environ.get("SOFTPROMPT_OBJECTS") or recorded
        if not objects:
            raise StoreError(f"the store at {self._index.where} does not say where its artifact bytes live: add "
                             "?objects=URL to the DSN (a shared directory or s3://bucket/prefix) the first time")
        if recorded is None:
            self._index.set_setting("objects", objects)
        elif recorded != objects:
            raise StoreError(f"the store at {self._index.where} keeps its bytes at {recorded}, not {objects}: "
                             "drop the objects setting (or point it at the same place)")
        if "://" in objects and not objects.startswith("file://"):
            self._blobs = FsspecBlobs(objects)
            self.root = _cache_dir(objects)  # the local copies, laid out as a local store's files
        else:
            self._blobs = LocalBlobs(Path(objects.removeprefix("file://")))
            self.root = self._blobs.root
        self._make_dirs()

    @property
    def remote(self) -> bool:
        """Whether the artifact bytes live in an object store (S3 and the like), `root` holding local copies."""
        return self._blobs.remote

    def _make_dirs(self) -> None:
        try:
            for sub in ("objects", "tmp", "files"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot use {self.root} as a prompt store: {e.strerror or e}") from None

    def _db(self):
        return self._index.conn()

    def _write(self):
        """The index's write transaction, holding the store's one write lock (see the module doc)."""
        return self._index.write()

    def object_path(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / f"{sha}.safetensors"

    def _row(self, ref: str) -> dict:
        name, version = parse_ref(ref)
        db, q = self._db(), "SELECT * FROM tasks WHERE name = ? "
        q += "AND version = ?" if version else "ORDER BY version DESC LIMIT 1"
        row = db.execute(q, (name, version) if version else (name,)).fetchone()
        if row is None:
            have = [v for (v,) in db.execute("SELECT version FROM tasks WHERE name = ? ORDER BY version", (name,))]
            if version and have:
                raise NoSuchTask(f"task {name!r} has no version {version} (versions: {', '.join(map(str, have))})")
            raise NoSuchTask(f"no task {name!r} in the store at {self.where} (`softprompt store ls` lists them)")
        return self._as_dict(row)

    def _as_dict(self, row) -> dict:
        d = dict(zip(COLUMNS, row))
        d["metrics"], d["tags"] = json.loads(d["metrics"]), json.loads(d["tags"])
        d["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d["created"]))
        d["path"] = str(self.object_path(d["sha256"]))
        return d

    # --- writing ---------------------------------------------------------------------------------
    def _blob(self, source, model) -> tuple[dict, bytes]:
        """(card, safetensors blob) of a source: our artifact (either form), a PEFT adapter directory
        (needs `model`), or an in-memory PromptMethod (needs `model`); tensors checked by checksum."""
        from softprompt.io.peft import import_peft, is_peft_dir

        if not isinstance(source, PromptMethod) and Path(source).is_dir() and is_peft_dir(source) \
                and not (Path(source) / CARD_FILE).exists():
            if model is None:
                raise StoreError(f"{source} is a PEFT adapter directory: converting it needs the base model "
                                 "(pass model=..., or --base PATH on the command line)")
            source = import_peft(source, model)
        if isinstance(source, PromptMethod):
            if model is None:
                raise StoreError("adding an in-memory prompt needs the base model it was made for (model=...)")
            # The card exactly as save_artifact writes it, built in memory: no staging file to fsync.
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in source.export_tensors().items()}
            data = data_section(st_save(tensors))
            card = make_card(source, model, tensors, metrics=(getattr(source, "card", None) or {}).get("metrics"))
            card.update(tensor_sha256=_sha(data), bytes=len(data))
            return card, st_save(tensors, metadata={META_KEY: json.dumps(card)})
        path = Path(source)
        card, blob = read_raw(path)
        check_card(card, path)
        data = data_section(blob)
        if _sha(data) != card.get("tensor_sha256"):
            raise StoreError(f"{path}: the tensor file is truncated or altered (its sha256 does not match the "
                             "card's tensor_sha256); restore or re-export it before adding it")
        return card, blob

    def add(self, name: str, source, model=None, *, tags=(), metrics: dict | None = None,
            compile: bool = True, allow_duplicate: bool = False) -> TaskRef:
        """Add `source` (artifact path, PEFT adapter directory, or PromptMethod + `model`) as the next
        version of `name`. Atomic: afterwards the task is fully there, or not at all. With `model`
        (and `compile`), the task's serving form for that model is compiled and stored too. Tensors
        equal to those of the latest version of `name` are refused unless `allow_duplicate`."""
        check_name(name)
        tags = sorted({str(t) for t in tags})
        where = name if isinstance(source, PromptMethod) else str(source)
        card, blob = self._blob(source, model)
        # the bytes agree with their header, the card and the base's geometry: only what loads gets in
        try:
            checks.check_loads(card, blob, where, model)
        except StoreError:
            raise
        except ArtifactError as e:  # the store's own refusal (one line, naming the file and the fault)
            raise StoreError(str(e)) from None
        base = card.get("base_model") or {}
        if not base.get("fingerprint"):
            raise StoreError(f"{source}: the card has no base-model fingerprint; re-export the artifact with this "
                             "softprompt so the store can tell which base model it serves")
        card = dict(card, metrics={**(card.get("metrics") or {}), **(metrics or {})})
        card, attachments = self._attachments(card, source)
        try:
            check_card(card, Path(where))  # with the metrics added, still within the card's bounds
        except ArtifactError as e:
            raise StoreError(str(e)) from None
        tensors = st_load(blob)
        blob = st_save(tensors, metadata={META_KEY: json.dumps(card)})  # always the single-file form
        if _sha(data_section(blob)) != card["tensor_sha256"]:  # safetensors' layout is deterministic
            raise StoreError(f"{source}: re-serializing changed the tensor bytes; not adding it")
        sha = _sha(blob)
        obj = self.object_path(sha)
        with self._write() as db:
            if not allow_duplicate:  # under the write lock: two racing adds of the same tensors make one version
                self._refuse_duplicate(db, name, card["tensor_sha256"])
            # The file goes in before the row, under the write lock (see the module docstring).
            if not obj.exists() or _sha(obj.read_bytes()) != sha:
                self._put(obj, blob)
            for dest, data in attachments:
                if not dest.exists():
                    self._put(dest, data)
            q = "SELECT coalesce(max(last_version), 0) + 1 FROM names WHERE name = ?"
            version = db.execute(q, (name,)).fetchone()[0]
            db.execute("INSERT INTO names VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET last_version = "
                       "excluded.last_version", (name, version))
            db.execute("INSERT INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (name, version, card["method"], card.get("num_virtual_tokens"), base["fingerprint"],
                        base.get("name"), len(blob), sha, json.dumps(card["metrics"]), json.dumps(tags), time.time()))
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        if model is not None and compile:  # the model is at hand: compile the serving form now, not on first serve
            self._compile_if_fits(TaskRef(name, version), card, model)
        return TaskRef(name, version)

    def _refuse_duplicate(self, db, name: str, tensor_sha: str) -> None:
        """Adding the very tensors the latest version of `name` holds is nearly always a command run
        twice, and a silent version 2 would look like a new model: refused in one line naming that
        version. Compared by the stored file's tensor bytes (a new card or metrics alone is no new
        model); a latest file that is missing or damaged compares as different, so a re-add repairs."""
        row = db.execute("SELECT version, sha256 FROM tasks WHERE name = ? ORDER BY version DESC LIMIT 1",
                         (name,)).fetchone()
        if row is None:
            return
        version, sha = row
        blob = self._read_blob(self.object_path(sha))
        try:
            same = blob is not None and _sha(blob) == sha and _sha(data_section(blob)) == tensor_sha
        except ArtifactError:  # a truncated file: not these tensors
            same = False
        if same:
            raise DuplicateArtifact(f"task {name}@{version} already holds these tensors (tensor sha256 {tensor_sha[:12]}...); "
                             "not adding them again as a new version (--allow-duplicate, in Python "
                             "allow_duplicate=True, adds them anyway)")

    def _compile_if_fits(self, ref: TaskRef, card: dict, model) -> None:
        from softprompt.families import card_family, family_of

        # only a prompt made for this very base has a compiled form for it (a classifier has none: it is
        # not served by the generation engine); others compile on first serve by the base that serves
        # them (or are refused there)
        if card.get("base_model", {}).get("fingerprint") == model_fingerprint(model) and not card.get("classifier") \
                and family_of(model).accepts_card_family(card_family(card)):
            self.compile(str(ref), model)

    def compile(self, ref: str, model, *, allow_other_base: bool = False) -> Path:
        """Compile a task's serving form for `model` and store it (again, if it was there); its path."""
        row = self._row(ref)
        e = StoreEntry(self, row["name"], row["version"], row["sha256"], Path(row["path"]))
        kv = compiled.compile_entry(e, model, allow_other_base=allow_other_base)
        return compiled.publish(self, e.sha256, model_fingerprint(model), kv)

    def _attachments(self, card: dict, source) -> tuple[dict, list[tuple[Path, bytes]]]:
        """(card, files to write): the `plot`, `inspection` and `offtask` (the off-task guard's summary,
        core/offtask.py) files a card names, when they are files
        beside the source artifact, become store files `files/<sha>.ext` and the card names those
        instead; any other name is dropped from the card."""
        out, files = dict(card), []
        for key, suffix in (("plot", ".png"), ("inspection", ".json"), ("offtask", ".safetensors")):
            value = out.get(key)
            if not isinstance(value, str):
                continue
            # only a file beside the source artifact (card_file_path): never what a card names elsewhere
            path = None if isinstance(source, PromptMethod) else card_file_path(source, value)
            try:
                ok = path is not None and path.suffix.lower() == suffix and path.stat().st_size <= MAX_ATTACHMENT_BYTES
                data = path.read_bytes() if ok else None
            except OSError:
                data = None
            if data is None:
                del out[key]
                continue
            name = f"files/{_sha(data)}{suffix}"
            out[key] = name
            files.append((self.root / name, data))
        return out, files

    def _put(self, obj: Path, blob: bytes) -> None:
        """Publish a file (a path under root): whole or not at all, durable before the row naming it."""
        if self._blobs.remote:  # the object store's PUT is the publish; the local copy is a cache
            self._blobs.put(self._key(obj), blob)
            write_atomic(obj, blob, self.root / "tmp", durable=False)
        else:
            write_atomic(obj, blob, self.root / "tmp")  # same filesystem: appears whole or not at all

    # --- files, local or remote: a path under root names the key root-relative ---------------------
    def _key(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def _fetch(self, path: Path, sha: str) -> bool:
        """Make the local copy of a remote file whose bytes must hash to `sha`; False if they do not
        (nothing is written), FileNotFoundError if there is none. A local store's files are local."""
        if not self._blobs.remote or Path(path).exists():
            return True
        return self._blobs.fetch(self._key(path), Path(path), sha, self.root / "tmp")

    def _remove(self, path: Path) -> bool:
        """Remove a file (and, for a remote store, its local copy); whether it was there."""
        gone = self._blobs.remove(self._key(path))
        if self._blobs.remote and Path(path).exists():
            Path(path).unlink()
        return gone

    def _list(self, prefix: str) -> list[Path]:
        return [self.root / k for k in self._blobs.list(prefix)]

    def _read_blob(self, path: Path) -> bytes | None:
        """The stored bytes themselves (for a remote store: the object, not the local copy); None if absent."""
        try:
            return self._blobs.read(self._key(path))
        except FileNotFoundError:
            return None

    def import_(self, src: str | os.PathLike, name: str | None = None, model=None, *, tags=(),
                metrics: dict | None = None, allow_duplicate: bool = False) -> TaskRef:
        """Add an artifact or a PEFT adapter directory; the name defaults to the file or directory name."""
        if name is None:
            name = Path(src).name.removesuffix(".safetensors")
            if not NAME_RE.fullmatch(name):
                raise StoreError(f"{src}: its name {name!r} is not a valid task name; give one (--name NAME)")
        return self.add(name, src, model, tags=tags, metrics=metrics, allow_duplicate=allow_duplicate)

    def rm(self, ref: str) -> list[TaskRef]:
        """Remove one version (`name@3`) or every version (`name`); returns what was removed."""
        name, version = parse_ref(ref)
        with self._write() as db:
            where, args = ("name = ? AND version = ?", (name, version)) if version else ("name = ?", (name,))
            rows = db.execute(f"SELECT version, sha256 FROM tasks WHERE {where}", args).fetchall()
            if not rows:
                self._row(ref)  # raises the right "unknown name / version" message
            db.execute(f"DELETE FROM tasks WHERE {where}", args)
            if approvals.has_table(self):  # a removed version's decisions go with it (numbers are never reused)
                db.execute(f"DELETE FROM approvals WHERE {where}", args)
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        # Files go only after the rows are committed (a crash in between leaves orphans, never
        # rows without files), under the write lock so no add can re-reference them meanwhile.
        self._collect({sha for _, sha in rows})
        return [TaskRef(name, v) for v, _ in rows]

    def _collect(self, shas) -> list[Path]:
        removed = []
        with self._write() as db:
            for sha in shas:
                if not db.execute("SELECT 1 FROM tasks WHERE sha256 = ? LIMIT 1", (sha,)).fetchone():
                    p = self.object_path(sha)
                    if self._remove(p):
                        removed.append(p)
            removed += compiled.collect(self, db)  # serving forms of artifacts no row names any more
        return removed

    def gc(self) -> list[Path]:
        """Remove files no index row names (left by a writer killed mid-add) and dead temp files."""
        with self._write():  # holding the write lock: no add is in flight, so every temp file is dead
            removed = list((self.root / "tmp").iterdir())
            for p in removed:
                p.unlink()
        found = {p.name.removesuffix(".safetensors") for p in self._list("objects")}
        removed += self._collect(found)
        with self._write() as db:
            removed += compiled.collect(self, db, files=True)
        return removed

    # --- reading ---------------------------------------------------------------------------------
    def resolve(self, ref: str) -> Path | None:
        """The artifact file of `name` (latest) or `name@N`; None if unknown (a TaskRegistry fallback)."""
        try:
            return Path(self._row(ref)["path"])
        except StoreError:
            return None

    def entry(self, ref: str) -> StoreEntry | None:
        """The resolved version of `name` or `name@N` as a StoreEntry; None if unknown; StoreError if
        its file is missing or has another size. As a TaskRegistry fallback (`fallback=store.entry`),
        tasks load through the index check."""
        try:
            row = self._row(ref)
        except StoreError:
            return None
        path = Path(row["path"])
        if self._blobs.remote:  # bytes in an object store: fetched into the local cache and hashed on load
            return StoreEntry(self, row["name"], row["version"], row["sha256"], path)
        # One stat per request: a deleted or resized file must not go on being served from a cache
        # of compiled prefixes while `show` says file_ok false (its content is hashed when loaded).
        try:
            size = path.stat().st_size
        except OSError:
            size = None
        if size != row["size"]:
            raise StoreError(f"task {row['name']}@{row['version']}: its file {path} is "
                             f"{'missing' if size is None else 'changed'} (removed or altered behind the index's "
                             "back); restore it, or `softprompt store rm` and re-add the task")
        return StoreEntry(self, row["name"], row["version"], row["sha256"], path)

    def open(self, ref: str, model, *, allow_other_base: bool = False) -> PromptMethod:
        """Load a task for `model`, refusing a file that changed behind the index's back."""
        row = self._row(ref)
        return self._load(StoreEntry(self, row["name"], row["version"], row["sha256"], Path(row["path"])), model,
                          allow_other_base)

    def _load(self, e: StoreEntry, model, allow_other_base: bool) -> PromptMethod:
        self._check_file(e)
        prompt = load_artifact(e.path, model, allow_other_base=allow_other_base)
        prompt.card = dict(prompt.card, store={"name": e.name, "version": e.version})
        return prompt

    def _check_file(self, e: StoreEntry) -> None:
        if self._blobs.remote:
            self._check_remote(e)
        _checked(e, e.path.read_bytes, str(e.path), "changed on disk")

    def _check_remote(self, e: StoreEntry) -> None:
        """The local copy of a remote artifact, fetched and checked if absent or not what the index says
        (a damaged copy is fetched again); the checks below then see a file that matches, or refuse."""
        try:
            if e.path.exists() and _sha(e.path.read_bytes()) == e.sha256:
                return
            e.path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        key = self._key(e.path)
        blob = _checked(e, lambda: self._blobs.read(key), self._blobs.url(key), "changed")
        write_atomic(e.path, blob, self.root / "tmp", durable=False)

    def ls(self, tag: str | None = None, base_fingerprint: str | None = None, all_versions: bool = False) -> list[dict]:
        """Index rows (no file is read), newest version per name unless `all_versions`, sorted by name."""
        where = [] if all_versions else ["version = (SELECT max(version) FROM tasks t WHERE t.name = tasks.name)"]
        args = [a for a in (tag, base_fingerprint) if a is not None]
        if tag is not None:
            where.append(self._index.tag_clause)
        if base_fingerprint is not None:
            where.append("base_fingerprint = ?")
        q = "SELECT * FROM tasks" + (" WHERE " + " AND ".join(f"({w})" for w in where) if where else "")
        rows = [self._as_dict(r) for r in self._db().execute(q, args)]
        state = approvals.states(self)
        for r in rows:
            r["state"] = state.get((r["name"], r["version"]), "draft")
        return sorted(rows, key=lambda r: (r["name"], r["version"]))  # code-point order under any collation

    def show(self, ref: str) -> dict:
        """The index row plus the card, whether the file still matches the index (`file_ok`), and
        why the card is refused when it is (`card_error`)."""
        row = self._row(ref)
        row["approval"] = approvals.current(self, row["name"], row["version"])
        row["state"] = (row["approval"] or {}).get("state", "draft")
        try:
            if self._blobs.remote:
                self._fetch(Path(row["path"]), row["sha256"])
            card, blob = read_raw(Path(row["path"]))
            row["file_ok"] = _sha(blob) == row["sha256"]
            row["card"] = card
            check_card(card, Path(row["path"]))  # a card that fails the schema is shown, and said to fail
        except ArtifactError as e:
            row["file_ok"] = row.get("file_ok", False)
            row["card"] = row.get("card")
            row["card_error"] = str(e)
        return row

    def export(self, ref: str, dest: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a task as an artifact: `dest` ending in .safetensors is the file, else a directory.
        An existing `dest` is refused unless `overwrite` (and then only an artifact is replaced)."""
        row, dest = self._row(ref), Path(dest)
        if dest.exists() or dest.is_symlink():
            if not overwrite:
                raise StoreError(f"{dest} already exists; choose a new path or pass --overwrite")
            if dest.is_dir() and any(dest.iterdir()) and not (dest / CARD_FILE).exists():
                raise StoreError(f"{dest} is a directory that is not a softprompt artifact; not overwriting it")
        if self._blobs.remote:
            self._check_file(StoreEntry(self, row["name"], row["version"], row["sha256"], Path(row["path"])))
        try:
            blob = Path(row["path"]).read_bytes()
        except OSError as e:
            raise StoreError(f"task {ref}: its store file {row['path']} cannot be read ({e.strerror or e}); "
                             "restore it, or `softprompt store rm` and re-add the task") from None
        if _sha(blob) != row["sha256"]:
            raise StoreError(f"task {ref}: the store file {row['path']} changed on disk behind the index's back; "
                             "not exporting it")
        if dest.suffix == ".safetensors":
            if dest.is_dir():
                raise StoreError(f"{dest} is a directory; give a file name or a path without .safetensors")
            write_file(dest, blob)
            return dest
        card, _ = read_raw(Path(row["path"]))
        with staged_dir(dest) as tmp:  # --overwrite of an artifact: the old one stays until this one is whole
            fsync_write(tmp / TENSOR_FILE, st_save(st_load(blob)))  # same tensor bytes, no metadata
            fsync_write(tmp / CARD_FILE, json.dumps(card, indent=2).encode())
        return dest

    def verify(self, trust_keys=()) -> list[str]:
        """Problems found by checking every indexed file against its sha256 and that it loads (empty:
        all good); with `trust_keys` (PEM public key files), also every approved version's signature,
        as `serve --require-approved --trust-key` would."""
        problems = []
        try:
            trusted = approvals.load_trusted(trust_keys)
        except approvals.ApprovalError as e:
            raise StoreError(str(e)) from None
        decided = approvals.states(self) if trusted else {}
        for row in self.ls(all_versions=True):
            p = Path(row["path"])
            blob = self._read_blob(p)  # the stored bytes (for a remote store, the object itself)
            if blob is None:
                problems.append(f"{row['name']}@{row['version']}: file {self._blobs.url(self._key(p))} is missing")
            elif _sha(blob) != row["sha256"]:
                problems.append(f"{row['name']}@{row['version']}: file {self._blobs.url(self._key(p))} changed "
                                "behind the index's back")
            else:  # the right bytes: do they load? (files added before this check existed)
                where = self._blobs.url(self._key(p))
                try:
                    card = checks.card_in(blob, where)
                    check_card(card, where)
                    checks.check_loads(card, blob, where)
                except ArtifactError as e:
                    problems.append(f"{row['name']}@{row['version']}: {e}")
                if decided.get((row["name"], row["version"])) == "approved":
                    why = approvals.signature_problem(approvals.current(self, row["name"], row["version"]), blob,
                                                      trusted)
                    if why is not None:
                        problems.append(f"{row['name']}@{row['version']} is approved, but {why}")
        return problems + compiled.verify(self)

    # --- approvals and the audit trail (store/approvals.py, store/trail.py) --------------------------
    def _entry_of(self, ref: str) -> StoreEntry:
        row = self._row(ref)
        return StoreEntry(self, row["name"], row["version"], row["sha256"], Path(row["path"]))

    def decide(self, ref: str, state: str, by: str, note: str = "", key: str | os.PathLike | None = None) -> dict:
        """Set the state of one version (`NAME@N`: a decision names one version, never "the latest")
        to "approved" or "revoked", by `by` because `note`; with `key` (an Ed25519 private key file,
        `softprompt store keygen`) the decision is signed over the artifact's checksums."""
        if state not in ("approved", "revoked"):
            raise StoreError(f"a decision is 'approved' or 'revoked', not {state!r}")
        if parse_ref(ref)[1] is None:
            raise StoreError(f"{ref!r}: name one version (NAME@N); an approval or a revocation is for one version")
        try:
            private = approvals.load_private(key) if key is not None else None
            return approvals.append(self, self._entry_of(ref), state, by, note, private)
        except approvals.ApprovalError as e:
            raise StoreError(str(e)) from None

    def approve(self, ref: str, by: str, note: str = "", key=None) -> dict:
        return self.decide(ref, "approved", by, note, key)

    def revoke(self, ref: str, by: str, note: str = "", key=None) -> dict:
        return self.decide(ref, "revoked", by, note, key)

    def approval(self, name: str, version: int) -> dict | None:
        """The current decision on name@version (None: a draft); one indexed read."""
        return approvals.current(self, name, version)

    def decisions(self, ref: str) -> list[dict]:
        """Every decision on a task (NAME) or a version (NAME@N), oldest first."""
        name, version = parse_ref(ref)
        self._row(ref)  # an unknown task or version is refused, not an empty list
        return approvals.log(self, name, version)

    def latest_approved(self, name: str) -> int | None:
        return approvals.latest_approved(self, check_name(name))

    def history(self, task: str | None = None, limit: int = 100) -> list[dict]:
        """The audit trail's newest `limit` rows (for `task`: a name, NAME@N for one version, or the
        base's served name; None: all), newest first (store/trail.py)."""
        name, at, v = (task or "").rpartition("@")
        if task is not None and at and v.isascii() and v.isdigit() and 0 < len(v) < 19:
            return trail.history(self, name, limit, int(v))
        return trail.history(self, task, limit)

    def version_token(self) -> int:
        """A number that changes whenever any process adds or removes a task (one indexed read)."""
        return self._db().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
