"""The store, read-only: what the web playground's table shows (list, card, plot, inspection)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from softprompt.serve.errors import APIError
from softprompt.serve.routers import service

router = APIRouter(prefix="/v1/tasks")


@router.get("")
async def tasks_list(svc=Depends(service)):
    rows = [svc.public(r) for r in svc.store.ls()] if svc.store is not None else []
    have = {r["name"] for r in rows}
    for name in svc.engine.tasks.names():
        if name not in have:
            try:
                rows.append({k: v for k, v in svc.public(svc.task_row(name)).items() if k != "card"})
            except APIError:
                pass
    return {"object": "list", "base_model": svc.config.base_model_id, "data": sorted(rows, key=lambda r: r["name"])}


@router.get("/{ref}/card")
async def task_card(ref: str, svc=Depends(service)):
    return svc.public(svc.task_row(ref))


@router.get("/{ref}/plot")
async def task_plot(ref: str, svc=Depends(service)):
    path = svc.card_file(svc.task_row(ref), "plot")
    if path is None or path.suffix.lower() != ".png":
        raise APIError(404, f"task {ref!r} has no training plot (its card names no .png `plot`)",
                       code="not_found", param="ref")
    return FileResponse(path, media_type="image/png")


@router.get("/{ref}/inspection")
async def task_inspection(ref: str, svc=Depends(service)):
    row = svc.task_row(ref)
    value = (row.get("card") or {}).get("inspection")
    if isinstance(value, dict):
        return value
    path = svc.card_file(row, "inspection")
    if path is None and row.get("path"):  # what `softprompt inspect ADAPTER` writes: ADAPTER.inspect.json
        path = svc.confined(str(row["path"]).rstrip("/").removesuffix(".safetensors") + ".inspect.json", row)
    if path is not None and path.suffix.lower() == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    raise APIError(404, f"task {ref!r} has no inspection summary yet", code="not_found", param="ref")
