"""The access log: one line per HTTP request on the "softprompt.access" logger, and the request's id.

`AccessLog` is the outermost ASGI middleware, so it sees every answer (the API-key check's 401 and
the body guard's 413 and 408 included) and times a request to its last byte (a stream: to its end):

    127.0.0.1:50312 "POST /v1/completions" 200 41.7ms id=6f1c0a9e2b7d4c35 key=alice

A line holds the method, the path (without its query string), the status, the milliseconds, the
request id and the API key's name: never a key, a query string or a body, which is where prompts
are. The same fields are on the log record (`record.method`, `path`, `status`, `duration_ms`,
`request_id`, `key`, `client`) for a structured handler. Status `-`: the client left before any answer.

The request id is the client's `X-Request-Id` when it sends a plain one (up to 128 letters, digits
and `._:-`), else a new one; the answer carries it back in `X-Request-Id` (as OpenAI's and vLLM's
do), so a client's report can be found in the log; routes read it as `request.state.request_id`.

The audit trail (store/trail.py): a model route marks its request (`Service.mark`: the task, its
version and checksum, the engine's handles) and, when the server keeps a trail, this middleware
hands one row per marked request to the `TrailWriter` once the answer is sent (the same id, key
name and status as the log line; token counts from the handles). Never the prompt or the text.

The key's name: the name the keys file gives it (`KEY # NAME`, serve/main.py), else `key_id(key)`,
`key-` and 8 hex digits of the key's SHA-256 (a fingerprint, which tells nothing of a random key);
`-` where no key was sent, `invalid` for a key that is not one of the server's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
import uuid

from softprompt.serve.guard import bearer_token, key_matches

LOGGER = "softprompt.access"
log = logging.getLogger(LOGGER)
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def key_id(key: str) -> str:
    """A key's fingerprint, the name it has in the log unless the keys file names it."""
    return "key-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]


class AccessLog:
    """Give each HTTP request an id (`X-Request-Id`) and, when `enabled`, log one line for it.
    `keys`: the server's API keys; `names`: key_id -> the name the keys file gives that key."""

    def __init__(self, app, keys=frozenset(), names: dict | None = None, enabled: bool = True, trail=None):
        self.app, self.keys, self.names, self.enabled = app, keys, dict(names or {}), enabled
        self.trail = trail  # a TrailWriter (store/trail.py) or None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = status or 500  # what the server's error handler answers for it (a cancelled request: none)
            raise
        finally:
            if self.enabled and log.isEnabledFor(logging.INFO):
                self._log(scope, headers, status, (time.perf_counter() - start) * 1000, rid)
            marked = scope["state"].get("trail")
            if self.trail is not None and marked is not None:
                self._record(marked, headers, status, rid, scope.get("path", ""))

    def _record(self, marked: dict, headers: dict, status: int | None, rid: str, path: str) -> None:
        """One trail row for a marked request; whatever goes wrong here is logged, never the client's."""
        try:
            tokens_in = tokens_out = 0
            for h in marked.get("handles") or ():
                result = getattr(h, "_result", None)
                if result is not None:
                    tokens_in += result.prompt_tokens or 0
                    tokens_out += len(result.token_ids or ())
            self.trail.record({"request_id": rid, "key_name": self._key_name(headers.get(b"authorization")),
                               "task": marked["task"], "version": marked.get("version"),
                               "sha256": marked.get("sha256"), "status": status, "tokens_in": tokens_in,
                               "tokens_out": tokens_out, "route": path[:128]})
        except Exception:  # noqa: BLE001  the answer is sent; a trail fault must not become a 500
            logging.getLogger("softprompt.trail").exception("could not record request %s in the audit trail", rid)

    def _log(self, scope, headers: dict, status: int | None, ms: float, rid: str) -> None:
        # the path as JSON escapes it: a client's control characters cannot forge a second line
        path = json.dumps(scope.get("path", ""), ensure_ascii=True)[1:-1][:512]
        client = scope.get("client")
        where = f"{client[0]}:{client[1]}" if client else "-"
        key = self._key_name(headers.get(b"authorization"))
        shown = "-" if status is None else str(status)
        log.info('%s "%s %s" %s %.1fms id=%s key=%s', where, scope.get("method", "-"), path, shown, ms, rid, key,
                 extra={"method": scope.get("method"), "path": path, "status": status, "duration_ms": round(ms, 3),
                        "request_id": rid, "key": key, "client": where})

    def _key_name(self, header: bytes | None) -> str:
        token = bearer_token(header.decode("latin-1")) if header else None
        if token is None:
            return "-"
        if not self.keys or not key_matches(token, self.keys):  # compared in constant time, as Auth does
            return "invalid" if self.keys else "-"
        ident = key_id(token)
        return self.names.get(ident, ident)


def to_stderr() -> None:
    """Show the access log on stderr, one timestamped line per request (`softprompt serve` does; a
    program that embeds the app configures logging as it likes)."""
    if not any(getattr(h, "softprompt_access", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handler.softprompt_access = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a root handler the program set up would print each line twice
