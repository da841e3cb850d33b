"""A server's view of a (possibly shared, remote) prompt store: task name -> StoreEntry.

Why it remembers: with the index on a database server, that server can go away for a while. The
tasks this server already holds must keep serving meanwhile, so the resolver keeps the last entry
it resolved per name and answers from it while the index is unreachable; /health then says
`"store": "degraded"`, a background probe notices the index's return, and new tasks and versions
show up again. While the index is up every request asks it (one indexed read, so a new version
serves at once); `ttl_s` > 0 reuses an answer that long, sparing the index a query per request. A task this server never resolved cannot be served without the index: the request
gets a retryable 503.
"""

from __future__ import annotations

import threading
import time

from softprompt.serve.tasks import TaskRefused
from softprompt.store.core import NoSuchTask, Store, StoreError, StoreUnavailable, parse_ref


class StoreResolver:
    """TaskRegistry fallback over `store` (see the module doc); `health()` is the /health hook."""

    def __init__(self, store: Store, ttl_s: float = 0.0, probe_every_s: float = 0.5):
        self.store, self.ttl_s, self.probe_every_s = store, ttl_s, probe_every_s
        self._known: dict[str, tuple[float, object]] = {}  # name -> (when resolved, StoreEntry or None)
        self._lock = threading.Lock()
        self.error: str | None = None  # why the index is unreachable now; None: reachable
        self._probe: threading.Thread | None = None
        self._unreachable = (*store.db_errors, OSError, StoreUnavailable)

    def __call__(self, name: str):
        now = time.monotonic()
        with self._lock:
            hit = self._known.get(name)
            degraded = self.error is not None
        if hit is not None and (degraded or now - hit[0] < self.ttl_s):
            return hit[1]
        if degraded:
            raise StoreUnavailable(f"the prompt store's index ({self.store.where}) is unreachable and this server "
                                   f"does not hold task {name!r} yet; retry shortly")
        try:
            parse_ref(name)
        except StoreError:  # a malformed name is as unknown as a missing one
            return None
        try:
            entry = self.store.entry(name)
        except NoSuchTask:  # unknown: the registry answers 404
            entry = None
        except StoreError as e:  # known, but its file is gone or changed: refused, never served from a cache
            raise TaskRefused(str(e)) from None
        except self._unreachable as e:
            self._degrade(e)
            return self(name)
        with self._lock:
            self._known[name] = (now, entry)
        return entry

    def _degrade(self, e: BaseException) -> None:
        with self._lock:
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if self._probe is None or not self._probe.is_alive():
                self._probe = threading.Thread(target=self._wait_for_index, name="softprompt-store-probe",
                                               daemon=True)
                self._probe.start()

    def _wait_for_index(self) -> None:
        while True:
            time.sleep(self.probe_every_s)
            try:
                self.store.version_token()
            except self._unreachable:
                continue
            with self._lock:
                self.error = None
                self._known.clear()  # versions may have changed meanwhile: resolve afresh
            return

    def health(self) -> dict:
        with self._lock:
            if self.error is None:
                return {"store": "ok"}
            return {"store": "degraded", "store_error": self.error}
