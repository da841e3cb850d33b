"""Health, the model list, Prometheus metrics and the web playground."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from softprompt.serve.routers import service

router = APIRouter()


@router.get("/health")
async def health(request: Request, svc=Depends(service)):
    """200 while the engine can generate; 503 (so a load balancer takes the node out) while it cannot.
    A loop that died is restarted here (and by the next request)."""
    alive = svc.engine.revive()
    st = svc.engine.status()
    body = {"status": "ok" if alive else "stopped", "running_rows": st["running_rows"], "waiting": st["waiting"],
            "restarts": st.get("restarts", 0), "faults": st.get("faults", 0)}
    for hook in request.app.state.health_hooks:  # e.g. {"store": "degraded"} while a shared index is down
        body.update(hook())
    return JSONResponse(body, 200 if alive else 503)


@router.get("/v1/models")
async def models(svc=Depends(service)):
    now, base = int(time.time()), svc.config.base_model_id
    ids = [base] + [n for n in svc.engine.tasks.names() if n != base]
    if svc.store is not None:
        ids += [r["name"] for r in svc.store.ls() if r["name"] not in ids]
    return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "softprompt"}
                                       for i in ids]}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(svc=Depends(service)):
    from softprompt.serve.metrics import render

    return PlainTextResponse(render(svc.engine), media_type="text/plain; version=0.0.4")


WEB = Path(__file__).resolve().parents[2] / "web"  # static files shipped in softprompt/web/


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(WEB / "index.html", media_type="text/html")
