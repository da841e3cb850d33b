"""The index in one SQLite file (WAL mode): the embedded default, one machine."""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT NOT NULL, version INTEGER NOT NULL, method TEXT NOT NULL, num_virtual_tokens INTEGER,
    base_fingerprint TEXT NOT NULL, base_name TEXT, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    metrics TEXT NOT NULL, tags TEXT NOT NULL, created REAL NOT NULL, UNIQUE (name, version));
CREATE INDEX IF NOT EXISTS tasks_fp ON tasks (base_fingerprint);
CREATE INDEX IF NOT EXISTS tasks_sha ON tasks (sha256);
-- last version ever given per name, so a removed version number is never reused for other content
CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL);
-- bumped by every write: version_token() lets a server notice changes without a restart
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('generation', 0);
"""
COMPILED_SCHEMA = """CREATE TABLE IF NOT EXISTS compiled (
    sha256 TEXT NOT NULL, base_fingerprint TEXT NOT NULL, dtype TEXT NOT NULL, kv_sha256 TEXT NOT NULL,
    shape TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (sha256, base_fingerprint, dtype))"""


class SQLiteIndex:
    """ROOT/index.sqlite. Writers serialize on SQLite's write lock (`BEGIN IMMEDIATE`); readers never
    wait for them (WAL)."""

    errors = (sqlite3.Error,)  # what a failing index raises (a read-only file, a full disk)
    tag_clause = "EXISTS (SELECT 1 FROM json_each(tasks.tags) WHERE value = ?)"
    compiled_schema = COMPILED_SCHEMA
    serial_key = "INTEGER PRIMARY KEY"  # the rowid: ever-increasing ids for append-only tables (store/trail.py)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where = str(self.path.parent)
        self._local = threading.local()
        db = self.conn()
        if not self.has_table("meta"):  # readers skip the write lock
            db.execute("PRAGMA journal_mode=WAL")  # persistent; readers never wait for the writer
            db.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")

    def conn(self) -> sqlite3.Connection:
        # One connection per thread and process: sqlite3 connections must not cross threads or forks.
        if getattr(self._local, "pid", None) != os.getpid():
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA busy_timeout=60000")
            db.execute("PRAGMA synchronous=NORMAL")  # in WAL: a committed add survives a killed process
            self._local.db, self._local.pid = db, os.getpid()
        return self._local.db

    @contextmanager
    def write(self):
        db = self.conn()
        db.execute("BEGIN IMMEDIATE")  # the write lock up front, so two adds never race for a version
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def has_table(self, name: str) -> bool:
        return self.conn().execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None

    def setting(self, key: str) -> str | None:  # a SQLite store's bytes are always beside its index
        return None
