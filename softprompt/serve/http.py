"""The HTTP API: OpenAI-compatible completions and chat over the engine, so existing clients work.

`"model"` names a task (an artifact name in the engine's registry or the prompt store, `name@3`
for a version) or the base model itself. Errors come in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with the matching status: 400 malformed JSON, bad
parameters (as OpenAI and vLLM answer them, `param` naming the field) or a request the model
cannot take, 401 missing or wrong API key, 404 unknown task or route, 405 wrong method, 408 body
not sent in time, 413 body over the limit, 429 queue full (with Retry-After), 500 a fault of the
server, 503 the engine cannot generate, 504 over the time limit. Errors known before a stream
starts are real HTTP errors, not a 200 with an error event.

Layout: `create_app` assembles middlewares (access.py: the request id and the access log, outermost;
guard.py: auth before the body, body limits), the error handlers (errors.py), a `Service`
(service.py) and the routers (routers/: completions, tasks, admin_tasks: publishing tasks over HTTP,
classify, admin: health, the model list, metrics); request schemas are in schemas.py, response
shapes in responses.py. `/docs` (Swagger UI) and `/redoc` load their scripts from this server: the
`fastapi-offline` package ships them, so the pages work with no network.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from softprompt.serve import errors
from softprompt.serve.access import AccessLog
from softprompt.serve.classify import ClassifyService
from softprompt.serve.errors import STATUS, APIError, ErrorJSON  # noqa: F401  (imported from here by older code)
from softprompt.serve.guard import Auth, BodyGuard
from softprompt.serve.model_list import base_created
from softprompt.serve.routers import admin, admin_tasks, classify, completions, tasks
from softprompt.serve.service import ServerConfig, Service


def create_app(engine, store=None, config: ServerConfig = ServerConfig(), classifier=None) -> FastAPI:
    """The FastAPI app over a (started or not) engine; starting/stopping follows the app's lifespan.
    `classifier`: the ClassifyService behind /v1/classify (default: one over the engine's model and tasks)."""

    gate, trail = _governance(engine, store, config)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()
        if trail is not None:
            trail.close()  # the rows still queued are written before the process ends

    # FastAPIOffline: a FastAPI app whose /docs and /redoc load Swagger UI and ReDoc from files the
    # package ships (mounted at /static-offline-docs), not from a CDN: blank pages offline otherwise.
    # validatorUrl null: Swagger UI would otherwise send the schema's URL to validator.swagger.io
    app = FastAPIOffline(title="softprompt", version="1", lifespan=lifespan,
                         swagger_ui_parameters={"validatorUrl": None},
                         description="OpenAI-compatible completions over many prompt-tuned tasks on one frozen model.")
    # add_middleware puts the last one outermost: the access log sees every answer, then Auth runs,
    # then the body is read (guard.py)
    app.add_middleware(BodyGuard, limit=config.max_body_bytes, timeout_s=config.body_timeout_s,
                       upload_limit=config.max_upload_bytes, is_upload=admin_tasks.is_upload)
    app.add_middleware(Auth, keys=config.api_keys)
    app.add_middleware(AccessLog, keys=config.api_keys, names=dict(config.api_key_names), enabled=config.access_log,
                       trail=trail)
    errors.install(app)
    classifier = classifier or ClassifyService(engine.model, engine.tokenizer, engine.tasks.resolve)
    app.state.service = Service(engine, store, config, classifier)
    app.state.engine, app.state.store, app.state.config, app.state.classifier = engine, store, config, classifier
    app.state.base_created = base_created(engine.model, int(time.time()))  # its `created` in /v1/models
    app.state.health_hooks = []  # callables -> dict merged into /health (e.g. a shared store's state)
    app.state.approval_gate, app.state.trail = gate, trail
    for router in (completions.router, classify.router, tasks.router, admin_tasks.router, admin.router):
        app.include_router(router)
    if admin.WEB.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=admin.WEB), name="static")
    return app


def _governance(engine, store, config: ServerConfig):
    """(approval gate, trail writer) as `config` asks: `require_approved` puts an ApprovalGate on the
    engine's task registry (every route resolves through it); `trail` records requests in `store`."""
    from softprompt.serve.resolver import ApprovalGate
    from softprompt.store.approvals import load_trusted
    from softprompt.store.trail import TrailWriter

    gate = None
    if config.require_approved:
        if store is None:
            raise ValueError("--require-approved serves approved store versions: it needs a prompt store")
        gate = ApprovalGate(store, load_trusted(config.trust_keys))  # a bad key file fails at start, in one line
        engine.tasks.gate = gate
    trail = TrailWriter(store, config.trail_max_rows) if config.trail and store is not None else None
    return gate, trail


__all__ = ["APIError", "ServerConfig", "create_app"]
