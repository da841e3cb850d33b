"""Tasks published over HTTP, like vLLM's /v1/load_lora_adapter but with the bytes in the request:
an operator uploads an artifact as the next version of a task, lists a task's versions, and
retires a version (or the whole task). Served at once: the engine resolves names through the store
on every request, so no restart and no reload call.

    POST   /v1/tasks/{name}            body: the single-file .safetensors artifact (its card in its
                                       metadata), as raw bytes; ?tags=a,b. 201 with the new version.
    GET    /v1/tasks/{name}/versions   every version of a task, oldest first
    DELETE /v1/tasks/{ref}             retire `name@3` (one version) or `name` (every version)

Writes change what every client is served, so they need the server to run with API keys (a server
without keys answers them 403); bodies are bounded by `max_upload_bytes` (guard.py) and checked
exactly as `softprompt store add` checks a file (card schema, tensor checksum, base fingerprint).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from softprompt.serve.errors import APIError
from softprompt.serve.routers import service

router = APIRouter(prefix="/v1/tasks")


def _writable(svc):
    if not svc.config.api_keys:
        raise APIError(403, "publishing or retiring tasks over HTTP needs the server to run with API keys "
                            "(--api-keys-file or $SOFTPROMPT_API_KEYS)", "permission_error", "writes_disabled")
    if svc.store is None:
        raise APIError(400, "this server has no prompt store to publish to", code="no_store")
    return svc.store


def _store_error(e: Exception, param: str) -> APIError:
    from softprompt.store.core import DuplicateArtifact, NoSuchTask

    if isinstance(e, NoSuchTask):
        return APIError(404, str(e), code="model_not_found", param=param)
    if isinstance(e, DuplicateArtifact):  # nothing wrong with the bytes: they are already there
        return APIError(409, " ".join(str(e).split()).replace("--allow-duplicate", "?allow_duplicate=true"),
                        code="duplicate_artifact", param="body")
    return APIError(400, " ".join(str(e).split()), code="invalid_artifact", param=param)


@router.post("/{name}", status_code=201)
async def upload(name: str, request: Request, tags: str | None = None, allow_duplicate: bool = False,
                 svc=Depends(service)):
    store = _writable(svc)
    from softprompt.io.artifact import ArtifactError

    body = await request.body()  # already read whole by BodyGuard, under max_upload_bytes
    if not body:
        raise APIError(400, "the body must be the artifact's .safetensors bytes (e.g. curl --data-binary "
                            "@task.safetensors)", code="invalid_artifact", param="body")
    tmp = Path(tempfile.mkdtemp(prefix="softprompt-upload-"))
    try:
        # a fresh folder holding only this file: a card naming a `plot` or `inspection` finds nothing
        # beside it to attach (card_schema.card_file_path), so a card never makes the server read its files
        path = tmp / "upload.safetensors"
        path.write_bytes(body)
        tag_list = [t for t in (tags or "").split(",") if t.strip()]
        try:
            ref = await run_in_threadpool(store.add, name, path, svc.engine.model, tags=tag_list,
                                         allow_duplicate=allow_duplicate)
        except (ArtifactError, ValueError, OSError) as e:
            raise _store_error(e, "name" if "bad task name" in str(e) else "body") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row = svc.public(store.show(str(ref)))
    row.pop("card", None)
    return JSONResponse({"object": "task", **row}, status_code=201)


@router.get("/{name}/versions")
async def versions(name: str, svc=Depends(service)):
    rows = [svc.public(r) for r in svc.store.ls(all_versions=True) if r["name"] == name] if svc.store else []
    if not rows:
        raise APIError(404, f"no task {name!r} in the store", code="model_not_found", param="name")
    return {"object": "list", "data": sorted(rows, key=lambda r: r["version"])}


@router.delete("/{ref}")
async def retire(ref: str, svc=Depends(service)):
    store = _writable(svc)
    from softprompt.io.artifact import ArtifactError

    try:
        removed = await run_in_threadpool(store.rm, ref)
    except (ArtifactError, ValueError) as e:
        raise _store_error(e, "ref") from None
    return {"object": "list", "deleted": True, "data": [{"name": r.name, "version": r.version} for r in removed]}


def is_upload(scope) -> bool:
    """POST /v1/tasks/{name}: the one route whose body may reach max_upload_bytes (guard.BodyGuard)."""
    parts = scope.get("path", "").strip("/").split("/")
    return scope.get("method") == "POST" and len(parts) == 3 and parts[:2] == ["v1", "tasks"]


__all__ = ["router", "is_upload"]
