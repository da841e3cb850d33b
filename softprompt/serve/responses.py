"""OpenAI's response shapes for completions and chat: choices, logprobs, usage, and the SSE stream.

Logprobs are the model's: the log-softmax of the logits each token was picked from, before
temperature, penalties and top-k/top-p (what OpenAI and vLLM report), so they do not depend on the
sampling parameters and greedy output is the same with or without them. A logprob of -inf (a token
the model rules out) is reported as -9999.0, as OpenAI does, since JSON has no infinity.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from softprompt.serve.errors import STATUS
from softprompt.serve.guard import error_bytes
from softprompt.serve.handle import TokenLogprob

FLOOR = -9999.0


@dataclass(frozen=True)
class Shape:
    """What a request asked of the response's form."""

    chat: bool
    model: str
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; else alternatives per token
    # completions with echo: each prompt as sent, text or token ids (per prompt, not per choice); ids are
    # decoded only when a response is written, so after the engine has checked them (an id outside
    # the vocabulary made the tokenizer raise before the request was refused)
    echo: list[str | list[int]] | None = None
    include_usage: bool = False


def echo_text(shape: Shape, choice: int, tokenizer) -> str:
    """The echoed prompt of a choice, as text."""
    p = shape.echo[choice // shape.n]
    return p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True)


def _lp(x: float) -> float:
    return max(x, FLOOR)


class Logprobs:
    """Turns TokenLogprobs into OpenAI's two logprobs shapes (legacy completions, chat)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._cache[token_id] = self.tok.decode([token_id])
        return s

    def completion(self, items: list[TokenLogprob], start: int = 0, text_len: int | None = None) -> dict:
        """{tokens, token_logprobs, top_logprobs, text_offset}; offsets count from `start` characters
        into the choice's text (clamped to its length: tokens after a stop string point at its end)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = start
        for t in items:
            piece = self.piece(t.token_id)
            out["tokens"].append(piece)
            out["token_logprobs"].append(None if t.logprob is None else _lp(t.logprob))
            out["top_logprobs"].append(None if t.logprob is None else {self.piece(i): _lp(v) for i, v in t.top})
            out["text_offset"].append(offset if text_len is None else min(offset, text_len))
            offset += len(piece)
        return out

    def chat(self, items: list[TokenLogprob]) -> dict:
        def entry(i, v):
            s = self.piece(i)
            return {"token": s, "logprob": _lp(v), "bytes": list(s.encode("utf-8"))}

        return {"content": [dict(entry(t.token_id, t.logprob), top_logprobs=[entry(i, v) for i, v in t.top])
                            for t in items], "refusal": None}


def choices(outs, shape: Shape, tokenizer) -> list[dict]:
    fmt = Logprobs(tokenizer) if shape.logprobs is not None else None
    result = []
    for i, o in enumerate(outs):
        c = {"index": i, "finish_reason": o.finish_reason, "logprobs": None}
        if shape.chat:
            c["message"] = {"role": "assistant", "content": o.text}
            if fmt is not None:
                c["logprobs"] = fmt.chat(o.logprobs or [])
        else:
            prefix = echo_text(shape, i, tokenizer) if shape.echo is not None else ""
            c["text"] = prefix + o.text
            if fmt is not None:
                items = list(o.prompt_logprobs or []) + list(o.logprobs or [])
                c["logprobs"] = fmt.completion(items, text_len=len(c["text"]))
        if getattr(o, "off_task", None) is not None:  # the task has an off-task summary (core/offtask.py)
            c["softprompt"] = {"off_task": o.off_task.to_dict()}
        result.append(c)
    return result


def off_task_headers(items) -> dict:
    """`x-softprompt-off-task` for the choices' verdicts (completions or admitted handles): the
    highest score's, so one header tells whether any prompt of the request was off its task."""
    verdicts = [v for v in (getattr(i, "off_task", None) for i in items) if v is not None]
    return {"x-softprompt-off-task": max(verdicts, key=lambda v: v.score).header()} if verdicts else {}


def usage(outs, n: int) -> dict:
    prompt = sum(o.prompt_tokens for o in outs[::n])  # a prompt's n choices share it
    completion = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def body(rid: str, outs, shape: Shape, tokenizer) -> dict:
    return {"id": rid, "object": "chat.completion" if shape.chat else "text_completion", "created": int(time.time()),
            "model": shape.model, "choices": choices(outs, shape, tokenizer), "usage": usage(outs, shape.n)}


async def sse(handles, rid: str, shape: Shape, tokenizer):
    """Server-sent events, one chunk per token (text may be empty while a split character or a
    possible stop string is held back); a dropped client cancels its rows. With include_usage every
    chunk has `"usage": null` and a last chunk with no choices carries the usage."""
    created = int(time.time())
    kind = "chat.completion.chunk" if shape.chat else "text_completion"
    fmt = Logprobs(tokenizer) if shape.logprobs is not None else None
    sent = [0] * len(handles)  # characters streamed per choice (text offsets of the next token)

    def chunk(i, text=None, finish=None, role=False, logprobs=()):
        lp = None
        if fmt is not None and logprobs:
            lp = fmt.chat(list(logprobs)) if shape.chat else fmt.completion(list(logprobs), start=sent[i])
        if shape.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            c = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}
        else:
            c = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": lp}
            sent[i] += len(text or "")
        data = {"id": rid, "object": kind, "created": created, "model": shape.model, "choices": [c]}
        if shape.include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        try:
            if shape.echo is not None:  # the prompt first (with its tokens' logprobs when asked)
                await queue.put(chunk(i, echo_text(shape, i, tokenizer), logprobs=h.prompt_logprobs or ()))
            async for ev in h.astream():
                if ev.text or ev.logprob is not None:
                    await queue.put(chunk(i, ev.text, logprobs=(ev.logprob,) if ev.logprob is not None else ()))
            res = h._result
            if res.finish_reason == "error":  # failed after it started: only an event can say so now
                await queue.put("data: " + error_bytes(res.error, "invalid_request_error" if STATUS.get(
                    res.error_code, 400) < 500 else "server_error", res.error_code).decode() + "\n\n")
            else:
                await queue.put(chunk(i, None if shape.chat else "", res.finish_reason))
        finally:
            await queue.put(None)

    try:
        if shape.chat:
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
        if shape.include_usage:
            outs = [h._result for h in handles]
            if all(o is not None and o.finish_reason != "error" for o in outs):
                data = {"id": rid, "object": kind, "created": created, "model": shape.model, "choices": [],
                        "usage": usage(outs, shape.n)}
                yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away (the generator is closed)
        for h in handles:
            if not h.done:
                h.cancel()
