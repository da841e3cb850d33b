"""What stands between the network and the API: the API-key check and the request-body guard, as
ASGI middleware, so both run before FastAPI parses or validates anything.

Order (outermost first): `Auth` (an unauthenticated client learns nothing, not even the schema's
errors), then `BodyGuard` (the whole body is read under a byte limit and a time limit before the
app sees it: an oversized body is a 413 whether announced by Content-Length or sent chunked, and
a half-sent body is a 408 instead of a connection held open forever).
Every refusal is JSON in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_bytes(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    # ensure_ascii: a message quoting client text with a lone surrogate still encodes
    return json.dumps(error_body(message, type_, code, param), ensure_ascii=True).encode()


async def send_error(send, status: int, message: str, type_: str, code: str, headers=()) -> None:
    body = error_bytes(message, type_, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def key_matches(token: str, keys) -> bool:
    """Constant-time comparison against every key (no early exit: the time says nothing about
    which key, or how much of one, matched)."""
    given = token.encode("utf-8", "surrogatepass")
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k.encode("utf-8"))
    return ok


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def protected(path: str) -> bool:
    """The API and the metrics need a key; /health, the playground's static files and the schema do not."""
    return path.startswith("/v1/") or path == "/v1" or path == "/metrics"


class Auth:
    """401 (with WWW-Authenticate) for a protected path without a valid bearer key."""

    def __init__(self, app, keys: frozenset[str]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or not protected(scope.get("path", "")):
            return await self.app(scope, receive, send)
        header = b""
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                header = value
        token = bearer_token(header.decode("latin-1"))
        if token is not None and key_matches(token, self.keys):
            return await self.app(scope, receive, send)
        challenge = b'Bearer realm="softprompt"' + (b', error="invalid_token"' if token is not None else b"")
        await send_error(send, 401, "missing or invalid API key (send Authorization: Bearer KEY)",
                         "authentication_error", "invalid_api_key", [(b"www-authenticate", challenge)])


class BodyGuard:
    """Read the whole body first, at most `limit` bytes within `timeout_s`, then hand it to the app."""

    def __init__(self, app, limit: int, timeout_s: float = 30.0, upload_limit: int | None = None, is_upload=None):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s
        # one route (a task artifact uploaded by an operator) may carry a larger body
        self.upload_limit, self.is_upload = upload_limit, is_upload

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if self.is_upload is not None and self.is_upload(scope) else self.limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return await self._too_large(send, limit)
        body, more = bytearray(), True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await send_error(send, 408, f"the request body did not arrive within {self.timeout_s:g} s",
                                        "invalid_request_error", "request_timeout")
            if msg["type"] == "http.disconnect":
                return  # the client is gone: nobody to answer
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                return await self._too_large(send, limit)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, for streaming responses

        await self.app(scope, replay, send)

    async def _too_large(self, send, limit: int):
        await send_error(send, 413, f"request body is over the limit of {limit} bytes", "invalid_request_error",
                         "body_too_large")
