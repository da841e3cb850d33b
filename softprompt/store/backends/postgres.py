"""The index in PostgreSQL (psycopg 3): one index shared by every server and writer on many machines.

Same tables and semantics as the SQLite index. Writers serialize on one transaction-scoped advisory
lock (the counterpart of SQLite's `BEGIN IMMEDIATE`): under it, READ COMMITTED sees every committed
version, so two processes adding to one task get distinct, dense version numbers; the unique key
(name, version) would refuse a duplicate anyway. Reads run in autocommit and never wait for writers.
A connection broken by a server restart is reopened on the next statement (one retry outside a
transaction), so a server rides out a short database outage without a restart of its own.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT NOT NULL, version INTEGER NOT NULL, method TEXT NOT NULL, num_virtual_tokens INTEGER,
    base_fingerprint TEXT NOT NULL, base_name TEXT, size BIGINT NOT NULL, sha256 TEXT NOT NULL,
    metrics TEXT NOT NULL, tags TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, UNIQUE (name, version));
CREATE INDEX IF NOT EXISTS tasks_fp ON tasks (base_fingerprint);
CREATE INDEX IF NOT EXISTS tasks_sha ON tasks (sha256);
CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO meta VALUES ('generation', 0) ON CONFLICT DO NOTHING;
-- where the artifact bytes live (an fsspec URL), recorded once so a server only needs the DSN
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS compiled (
    sha256 TEXT NOT NULL, base_fingerprint TEXT NOT NULL, dtype TEXT NOT NULL, kv_sha256 TEXT NOT NULL,
    shape TEXT NOT NULL, size BIGINT NOT NULL, created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (sha256, base_fingerprint, dtype));
"""
LOCK_KEY = 0x50524F4D  # the advisory lock every store writer takes ("PROM")
_QMARK = re.compile(r"\?")


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)


class _Conn:
    """A psycopg connection that speaks the store's SQL ('?' placeholders, as sqlite3)."""

    def __init__(self, index: "PostgresIndex"):
        self.index, self.raw, self.in_tx = index, None, False

    def _connect(self):
        import psycopg

        self.raw = psycopg.connect(self.index.dsn, autocommit=True, connect_timeout=self.index.connect_timeout)

    def execute(self, sql: str, args=()):
        import psycopg

        q = _QMARK.sub("%s", sql)
        if self.raw is None or self.raw.closed:
            self._connect()
        try:
            return self.raw.execute(q, args)
        except psycopg.OperationalError:
            if self.in_tx or not self.raw.closed and not self.raw.broken:
                raise  # inside a transaction the caller's retry decides; a live connection: a real error
            self._connect()  # the server restarted since our last statement: one fresh try
            return self.raw.execute(q, args)


class PostgresIndex:
    """The index at a `postgresql://` DSN; tables are created on first use."""

    tag_clause = "tags::jsonb @> jsonb_build_array(?::text)"
    compiled_schema = None  # created with the rest of the schema
    serial_key = "BIGSERIAL PRIMARY KEY"  # ever-increasing ids for append-only tables (store/trail.py)

    def __init__(self, dsn: str, connect_timeout: int = 3):
        import psycopg

        self.errors = (psycopg.Error,)
        self.dsn, self.connect_timeout = dsn, connect_timeout
        self.where = redact(dsn)
        self._local = threading.local()
        try:
            if not self.has_table("settings"):
                with self.write() as db:
                    for stmt in filter(str.strip, SCHEMA.split(";")):
                        db.execute(stmt)
        except psycopg.OperationalError as e:
            raise ConnectionError(f"cannot reach the store's PostgreSQL at {self.where}: {str(e).strip()}; "
                                  "check that the server runs and the DSN (user, host, port, database)") from None

    def conn(self) -> _Conn:
        # One connection per thread and process, as with sqlite3 (a connection must not cross a fork).
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.db, self._local.pid = _Conn(self), os.getpid()
        return self._local.db

    @contextmanager
    def write(self):
        db = self.conn()
        db.execute("SELECT 1")  # (re)connects outside the transaction if the server restarted
        db.in_tx = True
        try:
            with db.raw.transaction():
                db.execute("SELECT pg_advisory_xact_lock(?)", (LOCK_KEY,))
                yield db
        finally:
            db.in_tx = False

    def has_table(self, name: str) -> bool:
        return self.conn().execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()[0]

    def setting(self, key: str) -> str | None:
        row = self.conn().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        with self.write() as db:
            db.execute("INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                       (key, value))
