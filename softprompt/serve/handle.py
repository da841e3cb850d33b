"""Requests, their results, and the handle a caller holds while a request runs.

A handle streams events as the engine makes tokens, from a thread (`for ev in handle`) or from
asyncio (`async for ev in handle.astream()`), and can be cancelled, which frees its row at the next
step. When the engine has no background thread, waiting on a handle drives the engine itself.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from softprompt.core.offtask import OffTaskScore
from softprompt.loops.generate import SamplingParams
from softprompt.serve.structured import Constraint


@dataclass
class Request:
    """One generation request: a task (artifact name; None = the bare base model) and a prompt."""

    prompt: str | None = None
    task: str | None = None
    prompt_ids: list[int] | None = None  # instead of `prompt`, already tokenized
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's sampling fields, with vLLM's meaning (see SamplingParams)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] | list[int] = ()
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = None
    bad_words: tuple[str, ...] | list[str] = ()  # words (tokenized by the engine, as vLLM does)
    structured: Constraint | None = None  # what the output must match (serve/structured.py)
    add_special_tokens: bool | None = None  # when tokenizing `prompt`; None: the engine's default
    logprobs: int | None = None  # report each new token's logprob and this many top alternatives (0: none)
    prompt_logprobs: bool = False  # also the prompt tokens' logprobs (OpenAI's echo with logprobs)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # `task` already resolved (a serve.tasks.Task, by Service.task_of): the engine does not resolve it again
    resolved: object = field(default=None, repr=False, compare=False)

    def sampling(self) -> SamplingParams:
        """The sampling parameters (bad words not yet tokenized: the engine does that)."""
        from softprompt.serve.tasks import RequestError

        if (self.prompt is None) == (self.prompt_ids is None):
            raise RequestError("a request needs exactly one of prompt or prompt_ids")
        try:
            return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                  top_p=self.top_p, min_p=self.min_p, seed=self.seed, stop=tuple(self.stop),
                                  stop_token_ids=tuple(self.stop_token_ids),
                                  include_stop_str_in_output=self.include_stop_str_in_output,
                                  ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                                  presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                  repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias or (),
                                  allowed_token_ids=self.allowed_token_ids)
        except (ValueError, TypeError) as e:
            raise RequestError(str(e)) from e


class TokenLogprob(NamedTuple):
    """A token and its log-probability under the model (None: the prompt's first token, which
    nothing predicts), with the `top` most likely tokens at that position as (id, logprob) pairs."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Completion:
    request_id: str
    task: str | None
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or stop string), "length", "cancelled", "error"
    prompt_tokens: int
    error: str | None = None
    error_code: str | None = None
    logits: torch.Tensor | None = None  # (new tokens, V), only when the engine keeps logits
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked (Request.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, when asked (Request.prompt_logprobs)
    # the off-task guard's verdict (core/offtask.py), when the engine guards and the task has a summary;
    # also on a request refused for being off-task (error_code "off_task")
    off_task: OffTaskScore | None = None

    @classmethod
    def failed(cls, req: Request, exc: Exception) -> "Completion":
        return cls(request_id=req.request_id, task=req.task, text="", token_ids=[], finish_reason="error",
                   prompt_tokens=0, error=str(exc), error_code=getattr(exc, "code", "error"))


@dataclass(frozen=True)
class Event:
    token_id: int
    text: str  # the new text this token completes (may be empty)
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


class Handle:
    def __init__(self, request: Request, engine):
        self.request, self._engine = request, engine
        self._events: list[Event] = []
        self._result: Completion | None = None
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False
        self.prompt_logprobs: list[TokenLogprob] | None = None  # set at admission, before the first event
        self.off_task: OffTaskScore | None = None  # set at admission too (the guard scores the prefill)

    @property
    def done(self) -> bool:
        return self._result is not None

    # engine side
    def _push(self, token_id: int, text: str, logprob: TokenLogprob | None = None) -> None:
        with self._cond:
            self._events.append(Event(token_id, text, logprob))
            self._notify()

    def _finish(self, completion: Completion) -> None:
        with self._cond:
            if self._result is None:
                self._result = completion
            self._notify()

    def _notify(self):
        self._cond.notify_all()
        for loop, ev in self._async_waiters:
            loop.call_soon_threadsafe(ev.set)

    # caller side
    def cancel(self) -> None:
        """Stop this request; its row is freed at the next engine step."""
        self.cancelled = True
        self._engine._wake.set()

    def _wait(self, n_seen: int, timeout: float | None) -> None:
        if not self._engine.revive():  # no background loop (or a dead one not restarted): drive it from here
            self._engine.step()
            return
        with self._cond:
            if len(self._events) <= n_seen and self._result is None:
                self._cond.wait(timeout)

    def result(self, timeout: float | None = None) -> Completion:
        while self._result is None:
            self._wait(len(self._events), timeout)
        return self._result

    def __iter__(self):
        i = 0
        while True:
            if i < len(self._events):
                yield self._events[i]
                i += 1
            elif self._result is not None:
                return
            else:
                self._wait(i, 1.0)

    async def astream(self):
        """Async iterator over events; needs the engine running in the background (`engine.start()`)."""
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        with self._cond:
            self._async_waiters.append((loop, ev))
        try:
            i = 0
            while True:
                if i < len(self._events):
                    yield self._events[i]
                    i += 1
                    continue
                if self._result is not None:
                    return
                ev.clear()
                if i < len(self._events) or self._result is not None:
                    continue
                await ev.wait()
        finally:
            with self._cond:
                self._async_waiters.remove((loop, ev))

    async def aresult(self) -> Completion:
        async for _ in self.astream():
            pass
        return self._result
