"""OpenAI's completions and chat completions over the engine; `model` names a task or the base.
Request fields: schemas.py (what is honoured, what is refused); response shapes: responses.py."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from softprompt.serve.errors import APIError
from softprompt.serve.handle import Request
from softprompt.serve.responses import Shape, sse
from softprompt.serve.responses import body as response_body
from softprompt.serve.routers import service
from softprompt.serve.schemas import ChatRequest, CompletionRequest

router = APIRouter(prefix="/v1")


@router.post("/completions")
async def completions(body: CompletionRequest, request: HTTPRequest, svc=Depends(service)):
    prompts = body.prompts()
    if not prompts:
        raise APIError(422, "prompt must not be empty", code="invalid_parameter", param="prompt")
    # the prompt as text, also when it came as token ids (decoded once checked: responses.echo_text)
    shape = Shape(chat=False, model=body.model, n=body.n, logprobs=body.logprobs,
                  echo=list(prompts) if body.echo else None,
                  include_usage=body.include_usage)
    return await run(svc, request, body, prompts, shape)


@router.post("/chat/completions")
async def chat(body: ChatRequest, request: HTTPRequest, svc=Depends(service)):
    tok = svc.engine.tokenizer
    if not getattr(tok, "chat_template", None):  # e.g. T5/BART bases: plain text in, use completions
        raise APIError(400, f"the base model {svc.config.base_model_id!r} has no chat template, so chat messages "
                            "cannot be turned into its input: use /v1/completions with a prompt",
                       code="no_chat_template", param="messages")
    # OpenAI's "developer" role is its new name for "system", which chat templates know
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template that rejects the conversation (roles, order)
        raise APIError(400, f"the base model's chat template rejected these messages: {e}", param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    shape = Shape(chat=True, model=body.model, n=body.n, logprobs=logprobs, include_usage=body.include_usage)
    return await run(svc, request, body, [prompt], shape)


async def run(svc, request: HTTPRequest, body, prompts: list, shape: Shape):
    task, cfg = svc.task_of(body.model), svc.config
    if body.n > cfg.max_n:
        raise APIError(422, f"n is over this server's limit of {cfg.max_n}", code="invalid_parameter", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    common = dict(task=task and task.name, resolved=task, max_new_tokens=body.max_tokens or cfg.default_max_tokens, temperature=body.temperature,
                  top_p=body.top_p, top_k=max(0, body.top_k or 0), stop=stop, logprobs=shape.logprobs,
                  prompt_logprobs=shape.echo is not None and shape.logprobs is not None,
                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    reqs = [Request(**({"prompt": p} if isinstance(p, str) else {"prompt_ids": p}), **common,
                    seed=None if body.seed is None else body.seed + i)
            for p in prompts for i in range(body.n)]
    handles = svc.submit_all(reqs)
    rid = ("chatcmpl-" if shape.chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        await svc.until_admitted(handles)
        return StreamingResponse(sse(handles, rid, shape, svc.engine.tokenizer), media_type="text/event-stream")
    outs = await svc.results(handles, request)
    return response_body(rid, outs, shape, svc.engine.tokenizer)
