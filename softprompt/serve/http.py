"""The HTTP API: OpenAI-compatible completions and chat over the engine, so existing clients work.

`"model"` names a task (an artifact name in the engine's registry or the prompt store, `name@3`
for a version) or the base model itself. Errors come in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with the matching status: 400 malformed JSON or
a request the model cannot take, 422 bad parameters, 401 missing or wrong API key, 404 unknown
task, 413 body over the limit, 429 queue full (with Retry-After), 504 over the time limit.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from .classify import ClassifyRequest, ClassifyService
from .engine import Engine
from .handle import Request
from .schemas import ChatRequest, CompletionRequest
from .tasks import QueueFull, RequestError, UnknownTask

STATUS = {"unknown_task": 404, "task_refused": 400, "prompt_too_long": 400, "bad_request": 400, "internal_error": 500}


@dataclass(frozen=True)
class ServerConfig:
    """Every limit has a default."""

    base_model_id: str = "base"
    api_keys: frozenset[str] = frozenset()
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 120.0
    max_n: int = 8
    default_max_tokens: int = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes with 413, by header or while reading it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(error_body(f"request body is over the limit of {self.limit} bytes",
                                     "invalid_request_error", "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(engine: Engine, store=None, config: ServerConfig = ServerConfig(), classifier=None) -> FastAPI:
    """The FastAPI app over a (started or not) engine; starting/stopping follows the app's lifespan.
    `classifier`: the ClassifyService behind /v1/classify (default: one over the engine's model and tasks)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="softprompt", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions over many prompt-tuned tasks on one frozen model.")
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.state.engine, app.state.store, app.state.config = engine, store, config
    app.state.health_hooks = []  # callables -> dict merged into /health (e.g. a shared store's state)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return JSONResponse(error_body("the body is not valid JSON", "invalid_request_error", "invalid_json"), 400)
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:])}: {e.get('msg')}" for e in errs[:5])
        return JSONResponse(error_body(msg or "invalid request", "invalid_request_error", "invalid_parameter", param),
                            422)

    def check_key(request: HTTPRequest):
        if not config.api_keys:
            return
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:].strip() not in config.api_keys:
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                           "authentication_error", "invalid_api_key")

    def task_of(model: str) -> str | None:
        if model == config.base_model_id:
            return None
        try:
            engine.tasks.resolve(model)
        except UnknownTask:
            raise APIError(404, f"the model {model!r} does not exist: it is neither the base model "
                                f"{config.base_model_id!r} nor a task in the store", code="model_not_found",
                           param="model") from None
        return model

    @app.get("/health")
    async def health():
        st = engine.status()
        body = {"status": "ok" if engine.running else "stopped", "running_rows": st["running_rows"],
                "waiting": st["waiting"]}
        for hook in app.state.health_hooks:
            body.update(hook())
        return body

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_key(request)
        now = int(time.time())
        ids = [config.base_model_id] + [n for n in engine.tasks.names() if n != config.base_model_id]
        if store is not None:
            ids += [r["name"] for r in store.ls() if r["name"] not in ids]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "softprompt"}
                                           for i in ids]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: HTTPRequest):
        check_key(request)
        from .metrics import render

        return PlainTextResponse(render(engine), media_type="text/plain; version=0.0.4")

    # --- the store, read-only (the web playground's table) -----------------------------------------
    def task_row(ref: str) -> dict:
        """store.show(ref), or what the engine's registry knows of a task registered in memory."""
        if store is not None:
            from ..store import StoreError

            try:
                return store.show(ref)
            except (StoreError, ValueError):
                pass
        try:
            source = engine.tasks.resolve(ref)
        except UnknownTask:
            raise APIError(404, f"no task {ref!r} in the store", code="model_not_found", param="ref") from None
        card = getattr(source, "card", None)
        if card is None and isinstance(source, (str, Path)):
            try:
                from ..artifact import read_card

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

    def public(row: dict) -> dict:
        keep = ("name", "version", "method", "num_virtual_tokens", "bytes", "metrics", "created", "tags",
                "base_name", "base_fingerprint", "sha256", "file_ok", "card")
        out = {k: row[k] for k in keep if k in row}
        if "size" in row:  # the store index calls the file's size `size`
            out["bytes"] = row["size"]
        return out

    @app.get("/v1/tasks")
    async def tasks_list(request: HTTPRequest):
        check_key(request)
        rows = [public(r) for r in store.ls()] if store is not None else []
        have = {r["name"] for r in rows}
        for name in engine.tasks.names():
            if name not in have:
                try:
                    rows.append({k: v for k, v in public(task_row(name)).items() if k != "card"})
                except APIError:
                    pass
        return {"object": "list", "base_model": config.base_model_id, "data": sorted(rows, key=lambda r: r["name"])}

    @app.get("/v1/tasks/{ref}/card")
    async def task_card(ref: str, request: HTTPRequest):
        check_key(request)
        return public(task_row(ref))

    def card_file(row: dict, key: str) -> Path | None:
        """A file named by the card's optional `key` (absolute, or relative to the artifact's file)."""
        value = (row.get("card") or {}).get(key)
        if not isinstance(value, str) or not value:
            return None
        path = Path(value)
        if not path.is_absolute() and row.get("path"):
            path = Path(row["path"]).parent / path
        return path if path.is_file() else None

    @app.get("/v1/tasks/{ref}/plot")
    async def task_plot(ref: str, request: HTTPRequest):
        check_key(request)
        path = card_file(task_row(ref), "plot")
        if path is None or path.suffix.lower() != ".png":
            raise APIError(404, f"task {ref!r} has no training plot (its card names no .png `plot`)",
                           code="not_found", param="ref")
        return FileResponse(path, media_type="image/png")

    @app.get("/v1/tasks/{ref}/inspection")
    async def task_inspection(ref: str, request: HTTPRequest):
        check_key(request)
        row = task_row(ref)
        value = (row.get("card") or {}).get("inspection")
        if isinstance(value, dict):
            return value
        path = card_file(row, "inspection")
        if path is None and row.get("path"):  # what `softprompt inspect ADAPTER` writes: ADAPTER.inspect.json
            side = Path(str(row["path"]).rstrip("/").removesuffix(".safetensors") + ".inspect.json")
            path = side if side.is_file() else None
        if path is not None and path.suffix.lower() == ".json":
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
        raise APIError(404, f"task {ref!r} has no inspection summary yet", code="not_found", param="ref")

    # --- the web playground: static files shipped in softprompt/web/ -----------------------------------
    web = Path(__file__).resolve().parent.parent / "web"
    if web.is_dir():
        from fastapi.staticfiles import StaticFiles

        @app.get("/", include_in_schema=False)
        async def playground():
            return FileResponse(web / "index.html", media_type="text/html")

        app.mount("/static", StaticFiles(directory=web), name="static")

    # --- classification: label and per-class probabilities (compute in serve/classify.py) ---------------
    classifier = classifier or ClassifyService(engine.model, engine.tokenizer, engine.tasks.resolve)
    app.state.classifier = classifier

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: HTTPRequest):
        """`input` (a text or a list) through a classification task: per text its label and probabilities."""
        check_key(request)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        try:
            results = await asyncio.to_thread(classifier.classify, body.model, texts)
        except UnknownTask:
            raise APIError(404, f"the model {body.model!r} is not a task in the store", code="model_not_found",
                           param="model") from None
        except RequestError as e:  # a task that is no classifier (400), or bad texts (422, as bad parameters)
            if e.code == "task_refused":
                raise APIError(400, str(e), code=e.code, param="model") from None
            raise APIError(422, str(e), code="invalid_parameter", param="input") from None
        return {"object": "list", "model": body.model,
                "data": [{"object": "classification", "index": i, **r} for i, r in enumerate(results)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        check_key(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(422, "prompt must not be empty", code="invalid_parameter", param="prompt")
        return await run(request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HTTPRequest):
        check_key(request)
        if not getattr(engine.tokenizer, "chat_template", None):  # e.g. T5/BART bases: plain text in, use completions
            raise APIError(400, f"the base model {config.base_model_id!r} has no chat template, so chat messages cannot "
                                "be turned into its input: use /v1/completions with a prompt", code="no_chat_template",
                           param="messages")
        try:
            prompt = engine.tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in body.messages],
                                                          tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that rejects the conversation (roles, order)
            raise APIError(400, f"the base model's chat template rejected these messages: {e}", param="messages")
        return await run(request, body, [prompt], chat=True)

    async def run(request: HTTPRequest, body, prompts: list[str], chat: bool):
        task = task_of(body.model)
        if body.n > config.max_n:
            raise APIError(422, f"n is over this server's limit of {config.max_n}", code="invalid_parameter", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        reqs = []
        for p in prompts:
            for i in range(body.n):
                reqs.append(Request(prompt=p, task=task, max_new_tokens=body.max_tokens or config.default_max_tokens,
                                    temperature=body.temperature, top_p=body.top_p, stop=stop,
                                    seed=None if body.seed is None else body.seed + i))
        handles = []
        try:
            for r in reqs:
                handles.append(engine.submit(r))
        except QueueFull as e:
            for h in handles:
                h.cancel()
            raise APIError(429, str(e), "rate_limit_error", "queue_full",
                           headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            return StreamingResponse(stream(handles, rid, body.model, chat), media_type="text/event-stream")
        try:
            outs = await asyncio.wait_for(gather(handles, request), config.request_timeout_s)
        except asyncio.TimeoutError:
            for h in handles:
                h.cancel()
            raise APIError(504, f"the request took longer than {config.request_timeout_s:g} s", "timeout",
                           "timeout") from None
        for o in outs:
            if o.finish_reason == "error":
                raise APIError(STATUS.get(o.error_code, 400), o.error, code=o.error_code)
        choices = []
        for i, o in enumerate(outs):
            c = {"index": i, "finish_reason": o.finish_reason, "logprobs": None}
            c.update({"message": {"role": "assistant", "content": o.text}} if chat else {"text": o.text})
            choices.append(c)
        usage_prompt = sum(o.prompt_tokens for o in outs[:: body.n])
        usage_completion = sum(len(o.token_ids) for o in outs)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": usage_prompt, "completion_tokens": usage_completion,
                          "total_tokens": usage_prompt + usage_completion}}

    async def gather(handles, request: HTTPRequest):
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

    async def stream(handles, rid: str, model: str, chat: bool):
        """Server-sent events, one chunk per piece of text; a dropped client cancels its rows."""
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i, text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
                c = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                c = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model, 'choices': [c]})}\n\n"

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, h):
            try:
                async for ev in h.astream():
                    if ev.text:
                        await queue.put(chunk(i, ev.text))
                res = h._result
                if res.finish_reason == "error":
                    await queue.put("data: " + json.dumps(error_body(res.error, "invalid_request_error",
                                                                     res.error_code)) + "\n\n")
                else:
                    await queue.put(chunk(i, None if chat else "", res.finish_reason))
            finally:
                await queue.put(None)

        try:
            if chat:
                for i in range(len(handles)):
                    yield chunk(i, role=True)
            pumps = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
            remaining = len(pumps)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                else:
                    yield item
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the generator is closed)
            for h in handles:
                if not h.done:
                    h.cancel()

    return app
