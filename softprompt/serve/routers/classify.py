"""POST /v1/classify: a label and per-class probabilities per text (compute in serve/classify.py)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest

from softprompt.serve.errors import STATUS, APIError
from softprompt.serve.routers import service
from softprompt.serve.schemas import ClassifyRequest
from softprompt.serve.tasks import RequestError, UnknownTask

router = APIRouter()


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: HTTPRequest, svc=Depends(service)):
    """`input` (a text or a list) through a classification task: per text its label and probabilities."""
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    svc.mark(request, body.model)  # the audit trail: the task named (its version when the store has it)
    try:
        results = await asyncio.to_thread(svc.classifier.classify, body.model, texts)
    except UnknownTask:
        raise APIError(404, f"the model {body.model!r} is not a task in the store", code="model_not_found",
                       param="model") from None
    except RequestError as e:  # a task that is no classifier, or bad texts: 400s
        if e.code in ("task_refused", "task_not_approved"):  # the task, not the texts: 400 / 403
            raise APIError(STATUS[e.code], str(e), code=e.code, param="model") from None
        raise APIError(400, str(e), code="invalid_parameter", param="input") from None
    return {"object": "list", "model": body.model,
            "data": [{"object": "classification", "index": i, **r} for i, r in enumerate(results)]}
