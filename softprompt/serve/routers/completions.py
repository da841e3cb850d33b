"""OpenAI's completions and chat completions over the engine; `model` names a task or the base.
Request fields: schemas.py (what is honoured, what is refused); response shapes: responses.py."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from softprompt.serve.errors import APIError
from softprompt.serve.handle import Request
from softprompt.serve.prompt_format import chat_prompt, completion_prompts
from softprompt.serve.responses import Shape, sse
from softprompt.serve.responses import body as response_body, off_task_headers
from softprompt.serve.routers import service
from softprompt.serve.schemas import ChatRequest, CompletionRequest

router = APIRouter(prefix="/v1")


@router.post("/completions")
async def completions(body: CompletionRequest, request: HTTPRequest, svc=Depends(service)):
    prompts = body.prompts()
    if not prompts:
        raise APIError(400, "prompt must not be empty", code="invalid_parameter", param="prompt")
    # text in the task's prompt format (a chat-template task's goes in its template: prompt_format.py)
    svc.mark(request, body.model)  # the audit trail's row, also for a request refused below
    task = svc.task_of(body.model, request)  # resolved once: the format applied and the prefix served are one version's
    svc.mark(request, body.model, task)
    prompts = completion_prompts(task, prompts, svc.engine.tokenizer)
    # the prompt as the model sees it, also when it came as token ids (decoded once checked: responses.echo_text)
    shape = Shape(chat=False, model=body.model, n=body.n, logprobs=body.logprobs,
                  echo=list(prompts) if body.echo else None,
                  include_usage=body.include_usage)
    return await run(svc, request, body, prompts, shape, task)


@router.post("/chat/completions")
async def chat(body: ChatRequest, request: HTTPRequest, svc=Depends(service)):
    # OpenAI's "developer" role is its new name for "system", which chat templates know
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    # the task's prompt format: a plain-prompt task gets its one user message's text, as in training;
    # others (and the base) the chat template (prompt_format.py); a 400 saying why when neither fits
    svc.mark(request, body.model)
    task = svc.task_of(body.model, request)
    svc.mark(request, body.model, task)
    prompt = chat_prompt(task, messages, svc.engine.tokenizer, svc.config.base_model_id)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    shape = Shape(chat=True, model=body.model, n=body.n, logprobs=logprobs, include_usage=body.include_usage)
    return await run(svc, request, body, [prompt], shape, task)


async def run(svc, request: HTTPRequest, body, prompts: list, shape: Shape, task):
    cfg = svc.config
    if body.n > cfg.max_n:
        raise APIError(400, f"n is over this server's limit of {cfg.max_n}", code="invalid_parameter", param="n")
    max_new_tokens = body.max_tokens or cfg.default_max_tokens
    if (body.min_tokens or 0) > max_new_tokens:
        raise APIError(400, f"min_tokens must be at most max_tokens ({max_new_tokens})", code="invalid_parameter",
                       param="min_tokens")
    vocab = getattr(svc.engine, "vocab_size", None)  # token ids the model has, named here rather than in the loop
    for name, ids in (("stop_token_ids", body.stop_token_ids), ("allowed_token_ids", body.allowed_token_ids),
                      ("logit_bias", [int(k) for k in body.logit_bias or {}])):
        if vocab and any(not 0 <= i < vocab for i in ids or ()):
            raise APIError(400, f"{name} must hold token ids in [0, {vocab})", code="invalid_parameter", param=name)
    constraint = body.constraint
    if constraint is not None:  # compiled here, beside the loop, so a bad schema or regex is a 400 naming it
        import asyncio

        from softprompt.serve.structured import StructuredError

        grammars = getattr(svc.engine, "grammars", None)
        if grammars is None:
            raise APIError(400, "structured outputs are not supported by this engine", param=constraint.param)
        try:
            await asyncio.to_thread(grammars.check, constraint)
        except StructuredError as e:
            raise APIError(400, str(e), code="invalid_parameter", param=e.param) from None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    common = dict(task=task and task.name, resolved=task, max_new_tokens=max_new_tokens, temperature=body.temperature,
                  top_p=body.top_p, top_k=max(0, body.top_k or 0), stop=stop, logprobs=shape.logprobs,
                  prompt_logprobs=shape.echo is not None and shape.logprobs is not None,
                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                  min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty or 1.0,
                  min_tokens=body.min_tokens or 0, stop_token_ids=body.stop_token_ids or [],
                  include_stop_str_in_output=bool(body.include_stop_str_in_output), ignore_eos=bool(body.ignore_eos),
                  logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
                  allowed_token_ids=body.allowed_token_ids, bad_words=body.bad_words or [], structured=constraint,
                  add_special_tokens=body.add_special_tokens)
    reqs = [Request(**({"prompt": p} if isinstance(p, str) else {"prompt_ids": p}), **common,
                    seed=None if body.seed is None else body.seed + i)
            for p in prompts for i in range(body.n)]
    handles = svc.submit_all(reqs)
    svc.mark(request, body.model, task, handles)
    rid = ("chatcmpl-" if shape.chat else "cmpl-") + (body.request_id or uuid.uuid4().hex[:24])
    if body.stream:
        await svc.until_admitted(handles)  # the off-task verdict is known at admission, before any token
        return StreamingResponse(sse(handles, rid, shape, svc.engine.tokenizer), media_type="text/event-stream",
                                 headers=off_task_headers(handles))
    outs = await svc.results(handles, request)
    return JSONResponse(response_body(rid, outs, shape, svc.engine.tokenizer), headers=off_task_headers(outs))
