"""OpenAI's completions and chat completions over the engine; `model` names a task or the base."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request as HTTPRequest
from fastapi.responses import StreamingResponse

from ..errors import APIError
from ..handle import Request
from ..schemas import ChatRequest, CompletionRequest
from ..service import sse
from . import service

router = APIRouter(prefix="/v1")


@router.post("/completions")
async def completions(body: CompletionRequest, request: HTTPRequest, svc=Depends(service)):
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise APIError(422, "prompt must not be empty", code="invalid_parameter", param="prompt")
    return await run(svc, request, body, prompts, chat=False)


@router.post("/chat/completions")
async def chat(body: ChatRequest, request: HTTPRequest, svc=Depends(service)):
    tok = svc.engine.tokenizer
    if not getattr(tok, "chat_template", None):  # e.g. T5/BART bases: plain text in, use completions
        raise APIError(400, f"the base model {svc.config.base_model_id!r} has no chat template, so chat messages "
                            "cannot be turned into its input: use /v1/completions with a prompt",
                       code="no_chat_template", param="messages")
    try:
        prompt = tok.apply_chat_template([m.model_dump(exclude_none=True) for m in body.messages], tokenize=False,
                                         add_generation_prompt=True)
    except Exception as e:  # a template that rejects the conversation (roles, order)
        raise APIError(400, f"the base model's chat template rejected these messages: {e}", param="messages")
    return await run(svc, request, body, [prompt], chat=True)


async def run(svc, request: HTTPRequest, body, prompts: list[str], chat: bool):
    task, cfg = svc.task_of(body.model), svc.config
    if body.n > cfg.max_n:
        raise APIError(422, f"n is over this server's limit of {cfg.max_n}", code="invalid_parameter", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    reqs = [Request(prompt=p, task=task, max_new_tokens=body.max_tokens or cfg.default_max_tokens,
                    temperature=body.temperature, top_p=body.top_p, stop=stop,
                    seed=None if body.seed is None else body.seed + i)
            for p in prompts for i in range(body.n)]
    handles = svc.submit_all(reqs)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        await svc.until_admitted(handles)
        return StreamingResponse(sse(handles, rid, body.model, chat), media_type="text/event-stream")
    outs = await svc.results(handles, request)
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
