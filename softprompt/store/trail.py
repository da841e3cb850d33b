"""The audit trail: which request was served by which task version, with which bytes.

    trail(id, time_ms, request_id, key_name, task, version, sha256, status, tokens_in, tokens_out, route)

One row per request a server answered on a model route: the request's id (its X-Request-Id), the
API key's *name* (never the key), `task@version` and the artifact's sha256 (the base model's
requests too: task = the base's id, no version), the HTTP status and the token counts. No prompt
or completion text is ever stored.

Bounded: after each batch the oldest rows beyond `max_rows` are deleted, so the table cannot grow
without limit on a busy server; export what must be kept longer with `softprompt store history
TASK --json`. Serving never waits for the trail: `TrailWriter.record` appends to a memory queue
(bounded too: when the store is slower than the traffic, the newest rows beyond it are dropped and
counted) and one background thread writes batches; a write that fails is logged and dropped, and
the request it describes was answered long before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

log = logging.getLogger("softprompt.trail")

ROW = ("time_ms", "request_id", "key_name", "task", "version", "sha256", "status", "tokens_in", "tokens_out", "route")
DEFAULT_MAX_ROWS = 1_000_000
MAX_LIMIT = 1_000_000


def schema(store) -> str:
    serial = store._index.serial_key  # SQLite's rowid alias / PostgreSQL's BIGSERIAL
    return (f"CREATE TABLE IF NOT EXISTS trail (id {serial}, time_ms BIGINT NOT NULL, request_id TEXT, "
            "key_name TEXT, task TEXT NOT NULL, version INTEGER, sha256 TEXT, status INTEGER, tokens_in INTEGER, "
            "tokens_out INTEGER, route TEXT)")


def _ensure(store) -> None:
    if not getattr(store, "_trail_table", False):
        if not store._index.has_table("trail"):
            with store._write() as db:
                db.execute(schema(store))
                db.execute("CREATE INDEX IF NOT EXISTS trail_task ON trail (task, id)")
        store._trail_table = True


def append(store, rows: list[dict], max_rows: int = DEFAULT_MAX_ROWS) -> None:
    """Insert `rows` in one transaction, then delete the oldest beyond `max_rows`."""
    if not rows:
        return
    _ensure(store)
    cols = ", ".join(ROW)
    with store._write() as db:
        for r in rows:
            db.execute(f"INSERT INTO trail ({cols}) VALUES ({', '.join('?' * len(ROW))})", tuple(r.get(k) for k in ROW))
        (top,) = db.execute("SELECT coalesce(max(id), 0) FROM trail").fetchone()
        db.execute("DELETE FROM trail WHERE id <= ?", (top - max_rows,))


def history(store, task: str | None = None, limit: int = 100, version: int | None = None) -> list[dict]:
    """The newest `limit` rows (of one task, or one version of it, or all), newest first."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"--limit must be in 1..{MAX_LIMIT}")
    if not store._index.has_table("trail"):
        return []
    where, args = ("WHERE task = ? ", (task,)) if task is not None else ("", ())
    if task is not None and version is not None:
        where, args = "WHERE task = ? AND version = ? ", (task, version)
    q = f"SELECT id, {', '.join(ROW)} FROM trail {where}ORDER BY id DESC LIMIT ?"
    out = []
    for r in store._db().execute(q, (*args, limit)).fetchall():
        d = dict(zip(("id", *ROW), r))
        d["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(d["time_ms"] / 1000)) + \
            f".{d['time_ms'] % 1000:03d}Z"
        out.append(d)
    return out


class TrailWriter:
    """Rows recorded from request handlers, written to the store in batches by one daemon thread."""

    def __init__(self, store, max_rows: int = DEFAULT_MAX_ROWS, flush_s: float = 0.5, max_pending: int = 10_000):
        if max_rows <= 0:
            raise ValueError(f"the trail's max rows must be positive, got {max_rows}")
        self.store, self.max_rows, self.flush_s, self.max_pending = store, max_rows, flush_s, max_pending
        self._rows: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.written = self.dropped = self.errors = 0

    def record(self, row: dict) -> None:
        """Queue one row (never blocks on the store, never raises)."""
        with self._lock:
            if self._closed or len(self._rows) >= self.max_pending:
                self.dropped += 1
                return
            self._rows.append(dict(row, time_ms=row.get("time_ms") or int(time.time() * 1000)))
            if len(self._rows) >= self.max_pending // 2:  # a burst: write now rather than at the next tick
                self._wake.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="softprompt-trail", daemon=True)
                self._thread.start()

    def _take(self) -> list[dict]:
        with self._lock:
            rows, self._rows = list(self._rows), deque()
        return rows

    def flush(self) -> None:
        """Write what is queued now (the background thread does this every `flush_s`)."""
        rows = self._take()
        if not rows:
            return
        try:
            append(self.store, rows, self.max_rows)
            self.written += len(rows)
        except Exception as e:  # noqa: BLE001  a full disk, a database away: logged, serving goes on
            self.errors += 1
            self.dropped += len(rows)
            if self.errors > 3 and self.errors % 100:  # a store that stays unwritable: not a line per batch
                return
            log.warning("could not write %d audit trail row(s) to the store at %s: %s: %s", len(rows),
                        self.store.where, type(e).__name__, e)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        """Write what is left and stop taking rows (the server's shutdown)."""
        with self._lock:
            self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.flush()

    def stats(self) -> dict:
        with self._lock:
            pending = len(self._rows)
        return {"written": self.written, "pending": pending, "dropped": self.dropped, "errors": self.errors}
