"""Health, the model list, Prometheus metrics and the web playground."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from softprompt.serve.model_list import all_models, one_model
from softprompt.serve.routers import service

router = APIRouter()


@router.get("/health")
async def health(request: Request, svc=Depends(service)):
    """200 while the engine can generate; 503 (so a load balancer takes the node out) while it cannot.
    A loop that died is restarted here (and by the next request)."""
    alive = svc.engine.revive()
    st = svc.engine.status()
    body = {"status": "ok" if alive else "stopped", "running_rows": st["running_rows"], "waiting": st["waiting"],
            "restarts": st.get("restarts", 0), "faults": st.get("faults", 0), "backend": st.get("backend", "torch")}
    for hook in request.app.state.health_hooks:  # e.g. {"store": "degraded"} while a shared index is down
        body.update(hook())
    return JSONResponse(body, 200 if alive else 503)


@router.get("/v1/models")
async def models(request: Request, svc=Depends(service)):
    """The base model first, then every task (serve/model_list.py: OpenAI's fields and vLLM's
    `max_model_len`, `root`, `parent`)."""
    return {"object": "list", "data": _servable(request, svc, all_models(svc, _base_created(request)))}


def _servable(request: Request, svc, data: list[dict]) -> list[dict]:
    """Under `--require-approved`, only what this server serves: the base and the tasks with an
    approved version (a bare name serves its newest approved one: resolver.ApprovalGate)."""
    if getattr(request.app.state, "approval_gate", None) is None:
        return data
    from softprompt.store import approvals

    ok = {name for (name, _), state in approvals.states(svc.store).items() if state == "approved"}
    return [m for m in data if m["id"] == svc.config.base_model_id or m["id"] in ok]


# `:path`: a base model's id may hold '/' (HuggingFaceTB/SmolLM2-135M-Instruct; the openai client
# sends it as %2F, decoded before routing) and a task's '@' (name@3)
@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request, svc=Depends(service)):
    """One entry of the list, also for `name@N`; an unknown id is a 404 `model_not_found`."""
    return one_model(svc, model, _base_created(request))


def _base_created(request: Request) -> int:
    """The base model's `created` (create_app), the same in every answer."""
    return getattr(request.app.state, "base_created", None) or int(time.time())


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(svc=Depends(service)):
    from softprompt.serve.metrics import render

    return PlainTextResponse(render(svc.engine), media_type="text/plain; version=0.0.4")


WEB = Path(__file__).resolve().parents[2] / "web"  # static files shipped in softprompt/web/


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(WEB / "index.html", media_type="text/html")
