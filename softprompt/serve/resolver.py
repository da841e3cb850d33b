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

from softprompt.serve.tasks import TaskNotApproved, TaskRefused
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


class ApprovalGate:
    """`serve --require-approved`: a TaskRegistry gate (tasks.py) that lets through only store versions
    whose current decision is "approved" (store/approvals.py), and with `trusted` keys (key id ->
    Ed25519 public key) only those whose approval is signed by one of them over the artifact as
    stored now. Everything else is a 403 `task_not_approved` naming the version and its state.

    Asked on every request (one indexed read), so `softprompt store revoke` takes effect on the next
    request, with no restart. A bare name (`"model": "e2e"`) serves the newest *approved* version, so
    publishing a draft v3 does not take v2 off the air. A signature is checked once per (version,
    decision, file size and mtime) and remembered. When the index cannot be reached the gate cannot
    know about a revocation: the request gets a retryable 503, never an unchecked prefix."""

    MAX_REMEMBERED = 4096

    def __init__(self, store: Store, trusted: dict | None = None):
        self.store, self.trusted = store, dict(trusted or {})
        self._checked: dict[tuple, str | None] = {}
        self._lock = threading.Lock()
        self._unreachable = (*store.db_errors, OSError)

    def __call__(self, name: str, source):
        if not (hasattr(source, "sha256") and hasattr(source, "version") and hasattr(source, "verify")):
            raise TaskNotApproved(f"task {name!r} is not a version in the prompt store, and this server serves only "
                                  "approved store versions (--require-approved)")
        try:
            return self._check(name, source)
        except self._unreachable as e:
            raise StoreUnavailable(f"the prompt store's index ({self.store.where}) is unreachable, so the approval of "
                                   f"task {name!r} cannot be checked ({type(e).__name__}); retry shortly") from None

    def _check(self, name: str, e):
        decision = self.store.approval(e.name, e.version)
        if (decision is None or decision["state"] != "approved") and "@" not in name:
            newest = self.store.latest_approved(e.name)
            if newest is not None:
                try:
                    e = self.store.entry(f"{e.name}@{newest}") or e
                except StoreError as err:  # its file is gone or changed: refused, as the resolver does
                    raise TaskRefused(str(err)) from None
                decision = self.store.approval(e.name, e.version)
        state = decision["state"] if decision else "draft"
        if state != "approved":
            why = (f" (revoked by {decision['by']}: {decision['note'] or 'no reason given'})" if state == "revoked"
                   else "")
            raise TaskNotApproved(f"task {e.name}@{e.version} is {state}{why}; this server serves only approved "
                                  "versions (--require-approved): `softprompt store approve` it first", e)
        if self.trusted:
            problem = self._signature_problem(e, decision)
            if problem is not None:
                raise TaskNotApproved(f"task {e.name}@{e.version} is approved, but {problem}; this server serves only "
                                      "versions approved with a key it trusts (--trust-key)", e)
        return e

    def _signature_problem(self, e, decision: dict) -> str | None:
        from softprompt.store import approvals

        try:
            st = e.path.stat()
            seen = (st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None  # a remote store's copy not fetched yet: checked (and fetched) below
        key = (e.sha256, seen, *(decision[k] for k in approvals.ROW))  # the whole row: an edit is checked anew
        with self._lock:
            if seen is not None and key in self._checked:
                return self._checked[key]
        try:
            e.verify()  # the file is what the index names (a remote one is fetched)
            problem = approvals.signature_problem(decision, e.path.read_bytes(), self.trusted)
        except StoreError as err:
            raise TaskRefused(str(err)) from None
        with self._lock:
            if len(self._checked) >= self.MAX_REMEMBERED:
                self._checked.clear()
            self._checked[key] = problem
        return problem
