"""What the routes share: the engine, the store, the limits, and the steps every generation
request goes through (resolve the task, submit, wait or stream, answer). Routers (routers/) are
thin: they validate a body (schemas.py), call one of these, and shape the answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request as HTTPRequest

from softprompt.io.card_schema import card_file_path
from softprompt.serve.config import ServerConfig
from softprompt.serve.errors import STATUS, APIError
from softprompt.serve.tasks import QueueFull, RequestError, Task, UnknownTask


@dataclass
class Service:
    engine: object
    store: object = None
    config: ServerConfig = ServerConfig()
    classifier: object = None

    # --- tasks --------------------------------------------------------------------------------
    def mark(self, request: HTTPRequest, model: str, task: Task | None = None, handles=None) -> None:
        """Mark `request` for the audit trail (access.py writes the row once it is answered): what
        `model` names, resolved to `task` (its store version and checksum) once known."""
        if task is None and model == self.config.base_model_id:
            info = {"task": model, "version": None, "sha256": None}
        elif task is None:  # not resolved (yet): unknown, refused; the version it named, if any
            name, _, v = str(model)[:256].partition("@")
            info = {"task": name, "version": int(v) if v.isdigit() and len(v) < 19 else None, "sha256": None}
        elif hasattr(task.source, "sha256"):  # a store version (store/core.py StoreEntry)
            src = task.source
            info = {"task": src.name, "version": src.version, "sha256": src.sha256}
        else:  # a task registered in memory or by path: no store version
            info = {"task": task.name, "version": None, "sha256": None}
        prior = getattr(request.state, "trail", None)
        info["handles"] = handles if handles is not None else (prior or {}).get("handles")
        request.state.trail = info

    def task_of(self, model: str, request: HTTPRequest | None = None) -> Task | None:
        """The task a request's `model` names, resolved once (None: the base model): requests carry it
        to the engine, which does not resolve it again. Or a 404/400/403 APIError. With `request`, the
        audit trail's mark names the version resolved (or refused)."""
        if model == self.config.base_model_id:
            return None
        try:
            return self.engine.tasks.task(model)
        except UnknownTask:
            raise APIError(404, f"the model {model!r} does not exist: it is neither the base model "
                                f"{self.config.base_model_id!r} nor a task in the store", code="model_not_found",
                           param="model") from None
        except RequestError as e:  # a task the store refuses (e.g. its file is gone), or not approved
            if request is not None and getattr(e, "entry", None) is not None:
                self.mark(request, model, Task(model, e.entry))
            raise APIError(STATUS.get(e.code, 400), str(e), code=e.code, param="model") from None

    def task_row(self, ref: str) -> dict:
        """store.show(ref), or what the engine's registry knows of a task registered in memory."""
        if self.store is not None:
            from softprompt.store.core import StoreError

            try:
                return self.store.show(ref)
            except (StoreError, ValueError):
                pass
        try:
            source = self.engine.tasks.resolve(ref)
        except UnknownTask:
            raise APIError(404, f"no task {ref!r} in the store", code="model_not_found", param="ref") from None
        card = getattr(source, "card", None)
        if card is None and isinstance(source, (str, Path)):
            try:
                from softprompt.io.artifact import read_card

                card = read_card(source)
            except Exception:
                card = None
        card = card or {}
        nbytes = card.get("bytes")
        if nbytes is None and hasattr(source, "export_tensors"):  # an in-memory prompt: its float32 size
            nbytes = sum(4 * t.numel() for t in source.export_tensors().values())
        return {"name": ref, "version": None, "method": getattr(source, "method", None) or card.get("method"),
                "num_virtual_tokens": getattr(source, "num_virtual_tokens", None) or card.get("num_virtual_tokens"),
                "bytes": nbytes, "metrics": card.get("metrics", {}), "created": card.get("created"), "tags": [],
                "card": card or None, "path": str(source) if isinstance(source, (str, Path)) else None}

    @staticmethod
    def public(row: dict) -> dict:
        keep = ("name", "version", "method", "num_virtual_tokens", "bytes", "metrics", "created", "tags",
                "base_name", "base_fingerprint", "sha256", "file_ok", "card", "state")
        out = {k: row[k] for k in keep if k in row}
        if "size" in row:  # the store index calls the file's size `size`
            out["bytes"] = row["size"]
        return out

    def card_file(self, row: dict, key: str) -> Path | None:
        """A file named by the card's optional `key`. A card is client data: it never makes the server
        read outside the store's `files/` (where `store add` copies a task's plot and inspection) or,
        for a task registered by path, beside the artifact (card_schema.card_file_path)."""
        return self.confined((row.get("card") or {}).get(key), row)

    def confined(self, value, row: dict) -> Path | None:
        if not isinstance(value, str) or not value:
            return None
        if row.get("sha256") and self.store is not None:  # a store task: its attachments
            files = (Path(self.store.root) / "files").resolve()
            try:
                real = (files.parent / value).resolve(strict=True)
            except (OSError, RuntimeError, ValueError):
                real = None
            if real is not None and real.parent == files and real.is_file():
                return real
        return card_file_path(row["path"], value) if row.get("path") else None

    # --- generation ---------------------------------------------------------------------------
    def submit_all(self, requests) -> list:
        """Handles for `requests`, all or none: a full queue cancels those already queued (429)."""
        handles = []
        try:
            for r in requests:
                handles.append(self.engine.submit(r))
        except QueueFull as e:
            for h in handles:
                h.cancel()
            raise APIError(429, str(e), "rate_limit_error", "queue_full",
                           headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
        return handles

    async def until_admitted(self, handles) -> None:
        """Wait until every request has its first token or has ended, so whatever the engine refuses at
        admission (empty prompt, too long, a refused task) is a real HTTP error, not a 200 stream."""
        timeout = self.config.request_timeout_s
        try:
            await asyncio.wait_for(asyncio.gather(*[_started(h) for h in handles]), timeout)
        except asyncio.TimeoutError:
            for h in handles:
                h.cancel()
            raise APIError(504, f"the request did not start within {timeout:g} s", "timeout", "timeout") from None
        failed = next((h._result for h in handles if h.done and h._result.finish_reason == "error"), None)
        if failed is not None:
            for h in handles:
                h.cancel()
            status = STATUS.get(failed.error_code, 400)
            raise APIError(status, failed.error, "invalid_request_error" if status < 500 else "server_error",
                           code=failed.error_code, headers={"Retry-After": "5"} if status == 503 else None)

    async def results(self, handles, request: HTTPRequest) -> list:
        """Every handle's completion; a client that goes away cancels its rows; errors as APIError."""
        timeout = self.config.request_timeout_s
        try:
            outs = await asyncio.wait_for(_gather(handles, request), timeout)
        except asyncio.TimeoutError:
            for h in handles:
                h.cancel()
            raise APIError(504, f"the request took longer than {timeout:g} s", "timeout", "timeout") from None
        for o in outs:
            if o.finish_reason == "error":
                status = STATUS.get(o.error_code, 400)
                raise APIError(status, o.error, "invalid_request_error" if status < 500 else "server_error",
                               code=o.error_code)
        return outs


async def _started(h):
    """Return once the request has its first token or has ended."""
    events = h.astream()
    try:
        await events.__anext__()
    except StopAsyncIteration:
        pass
    finally:
        await events.aclose()


async def _gather(handles, request: HTTPRequest):
    """Wait for every handle; a client that goes away cancels its rows."""
    task = asyncio.gather(*[h.aresult() for h in handles])
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            for h in handles:
                h.cancel()
            task.cancel()
            raise asyncio.CancelledError()
