"""What every serving engine shares, whatever its batching: the queue and its limit, the
background loop, handles, task prefixes through one cache, and turning logits into streamed text.

A subclass implements `step()` (one unit of work; False when idle) with its own batching:
`Engine` (decoder-only, continuous batching) and `Seq2SeqEngine` (encoder-decoder, one batch at
a time). Both call `_prepare_common` for each request and `_emit` after each forward pass.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import replace

import torch

from softprompt.loops.generate import (
    SamplingParams,
    bad_words_ids,
    cut_at_stop,
    eos_ids,
    greedy_ids,
    penalize,
    pick_next,
    token_logprobs,
)
from softprompt.serve.handle import Completion, Handle, Request, TokenLogprob
from softprompt.serve.loader import TaskLoader, done_future
from softprompt.serve.structured import Constraint, Grammars, Matcher
from softprompt.serve.tasks import PrefixCache, QueueFull, RequestError, Task, TaskRegistry, compile_task

log = logging.getLogger("softprompt.serve")


class OffTaskRefused(RequestError):
    """The request's input is off its task (the guard's score is past the task's threshold) and the
    engine refuses such requests (off_task="reject"): a 4xx, decided before any token is made."""

    code = "off_task"


def fault(what: str, exc: BaseException) -> RequestError:
    """An unexpected failure, as the error a request ends with (HTTP 500: the server's fault)."""
    return RequestError(f"{what} failed: {type(exc).__name__}: {exc}", code="internal_error")


def check_request(request: Request, vocab_size: int | None) -> None:
    """Refuse at the door what the tokenizer or the model cannot take (RequestError): text that is
    not encodable Unicode (a lone surrogate from a JSON "\\ud800" escape made the tokenizer raise
    inside the loop), token ids outside the vocabulary (the prompt's, and those of stop_token_ids,
    logit_bias and allowed_token_ids), bad words that are not text."""
    if request.prompt is not None:
        if not isinstance(request.prompt, str):
            raise RequestError(f"the prompt must be a string, got {type(request.prompt).__name__}")
        try:
            request.prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"the prompt is not valid Unicode text: a lone surrogate at character {e.start}",
                               code="invalid_text") from None
    if request.prompt_ids is not None:
        ids = request.prompt_ids
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 or (vocab_size and i >= vocab_size)
               for i in ids):
            raise RequestError(f"prompt_ids must be token ids in [0, {vocab_size})")
    params = request.sampling()  # the sampling parameters' own checks
    if vocab_size:
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                          ("logit_bias", [t for t, _ in params.logit_bias])):
            if any(i >= vocab_size for i in ids or ()):
                raise RequestError(f"{name} must be token ids in [0, {vocab_size}), got {max(ids)}")
    words = request.bad_words or ()
    if isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words):
        raise RequestError("bad_words must be a list of non-blank strings")
    if request.structured is not None and not isinstance(request.structured, Constraint):
        raise RequestError("structured must be a softprompt.serve.structured.Constraint")


class Row:
    """One request being decoded: its sampling state and what it has streamed. `prompt_ids` are the
    tokens the repetition penalty counts besides the generated ones (a decoder's prompt); `matcher`
    its structured output's grammar state, or None."""

    __slots__ = ("handle", "params", "gen", "ids", "text", "sent", "prompt_tokens", "logits", "logprobs",
                 "prompt_ids", "matcher", "stop_from")

    def __init__(self, handle: Handle, params: SamplingParams, prompt_tokens: int, prompt_ids=(),
                 matcher: Matcher | None = None):
        self.handle, self.params, self.prompt_tokens = handle, params, prompt_tokens
        self.prompt_ids, self.matcher = prompt_ids, matcher
        self.stop_from = 0  # stop strings are looked for from this character on (see min_tokens)
        self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                 else int(torch.randint(0, 2**62, (1,))))
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.logits: list[torch.Tensor] | None = None
        self.logprobs: list[TokenLogprob] | None = [] if handle.request.logprobs is not None else None


class BaseEngine:
    """The queue, the loop and the token-out path; see the module docstring.

    Limits (all with defaults): `max_batch_size` rows decode together, `max_queue` requests may
    wait (more are refused with QueueFull), `max_new_tokens_limit` caps a request,
    `prefix_cache_bytes` bounds the compiled prefixes kept in memory.
    """

    thread_name = "softprompt-engine"
    prompt_logprobs = False  # whether a subclass scores prompt tokens (Request.prompt_logprobs)
    off_task: str | None = None  # the off-task guard's policy (a subclass that guards sets it; core/offtask.py)
    guard_depth: int | None = None  # the decoder layers a guarded subclass can read a summary's layer from

    def __init__(self, model, tokenizer, tasks: TaskRegistry | Mapping | None = None, *, max_batch_size: int = 32,
                 max_queue: int = 1024, max_new_tokens_limit: int = 2048, prefix_cache_bytes: int = 256 * 2**20):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.tasks = tasks if isinstance(tasks, TaskRegistry) else TaskRegistry(tasks)
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.max_batch_size, self.max_queue, self.max_new_tokens_limit = max_batch_size, max_queue, max_new_tokens_limit
        self.eos = eos_ids(tokenizer, model)
        self.device = next(model.parameters()).device
        self._waiting: deque[tuple[Handle, Request]] = deque()
        self._rows: list[Row] = []
        self._lock = threading.Lock()  # guards the waiting queue only: submit never waits for a forward pass
        self._step_lock = threading.Lock()  # one step at a time owns the running batch (rows, cache)
        self._wake = threading.Event()
        self.loader = TaskLoader(self.prefixes, on_done=self._wake.set)
        # waiting request (by id; the request itself kept to rule out a reused id) -> its task's prefix
        self._loads: dict[int, tuple[Request, Future]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._wanted = False  # start() was called and stop() was not: a dead loop is to be restarted
        self._start_lock = threading.Lock()
        self.vocab_size = getattr(model.config, "vocab_size", None)
        self.grammars = Grammars(tokenizer, self.vocab_size)  # structured outputs (serve/structured.py)
        self.stats = {"requests": 0, "completed": 0, "errors": 0, "cancelled": 0, "refused_queue_full": 0,
                      "generated_tokens": 0, "prompt_tokens": 0, "steps": 0, "batch_rows_sum": 0,
                      "faults": 0, "restarts": 0}

    # ---- public API ---------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        """Queue a request; returns its handle at once. Raises QueueFull when the queue is at its limit.
        A request refused at the door (see check_request) gets a handle that is already finished."""
        handle = Handle(request, self)
        try:
            check_request(request, self.vocab_size)
        except RequestError as e:
            with self._lock:
                self.stats["requests"] += 1
                self.stats["errors"] += 1
            handle._finish(Completion.failed(request, e))
            return handle
        self.revive()
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self.stats["refused_queue_full"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later", retry_after=1.0)
            self._waiting.append((handle, request))
            self.stats["requests"] += 1
        self._wake.set()
        return handle

    def generate(self, requests: Iterable[Request]) -> list[Completion]:
        """Run requests to completion (in this thread unless the engine runs in the background)."""
        handles = [self.submit(r) for r in requests]
        return [h.result() for h in handles]

    def stream(self, request: Request):
        """Iterate over a request's events (token id, text delta) as they are made."""
        return iter(self.submit(request))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        """Run the step loop in a background thread (for servers and streaming)."""
        with self._start_lock:
            self._wanted = True
            if not self.running:
                self._stop = False
                self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self._thread.start()
        return self

    def revive(self) -> bool:
        """Restart the loop if it was started and has died; True when it is running now. The rows it
        was decoding end with an error (their state died with it); waiting requests are kept."""
        if not self._wanted or self.running:
            return self.running
        with self._start_lock:
            if self._wanted and not self.running:
                log.error("the engine loop died; restarting it")
                self.stats["restarts"] += 1
                self._fail_running(RequestError("the engine restarted while this request ran",
                                                code="internal_error"))
                self._stop = False
                self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self._thread.start()
        return self.running

    def stop(self) -> None:
        self._wanted = False
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def status(self) -> dict:
        return {"running_rows": len(self._rows), "waiting": len(self._waiting), "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue, "prefix_cache": self.prefixes.stats(), **self.stats}

    def step(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _loop(self):
        while not self._stop:
            try:
                busy = self.step()
            except Exception as e:  # no row to blame (a failed decode pass): end the running rows, go on
                log.exception("engine step failed")
                self.stats["faults"] += 1
                self._fail_running(fault("a decoding step", e))
                continue
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def _fail_running(self, error: RequestError) -> None:
        """End every running row with `error` and drop the batch (its state may be half-updated)."""
        with self._lock:
            for r in self._rows:
                if not r.handle.done:
                    self.stats["errors"] += 1
                    r.handle._finish(Completion.failed(r.handle.request, error))
            self._reset_batch()

    def _reset_batch(self) -> None:
        """Forget the running batch (a subclass also drops its cache)."""
        self._rows = []

    def _fail(self, handle: Handle, error: RequestError) -> None:
        """End one request with an error (its row, if any, is dropped at the next compaction)."""
        self.stats["errors"] += 1
        handle._finish(Completion.failed(handle.request, error))

    # ---- requests in ----------------------------------------------------------------------
    def _prepare_common(self, req: Request, add_special_tokens: bool):
        """(sampling params, the task's compiled prefix or None, prompt token ids), or RequestError.
        `add_special_tokens`: the family's way of tokenizing a prompt, unless the request says."""
        params = req.sampling()
        if req.bad_words:
            try:
                params = replace(params, bad_words_ids=bad_words_ids(self.tokenizer, req.bad_words))
            except ValueError as e:
                raise RequestError(str(e)) from None
        if req.prompt_logprobs and not self.prompt_logprobs:
            raise RequestError("echo with logprobs (the prompt tokens' logprobs) needs a decoder-only base; "
                               "this model's prompt is an encoder input, which has no logprobs", code="bad_request")
        if params.max_new_tokens > self.max_new_tokens_limit:
            raise RequestError(f"max_new_tokens {params.max_new_tokens} is over this engine's limit "
                               f"{self.max_new_tokens_limit}")
        prefix = None
        if req.task is not None:
            slot = self._loads.pop(id(req), None)
            fut = slot[1] if slot is not None and slot[0] is req else self._load_task(req.resolved or req.task,
                                                                                         background=False)
            prefix = fut.result()  # loaded beside the loop (see _take_ready), or here; a failed load raises
        if req.add_special_tokens is not None:
            add_special_tokens = req.add_special_tokens
        ids = list(req.prompt_ids) if req.prompt_ids is not None else \
            self.tokenizer(req.prompt, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise RequestError("the prompt is empty")
        return params, prefix, ids

    def _matcher(self, req: Request) -> Matcher | None:
        """A fresh grammar matcher for the request's row, if it asks for a structured output."""
        return None if req.structured is None else self.grammars.matcher(req.structured)

    # ---- task prefixes, loaded beside the loop --------------------------------------------
    def _load_task(self, task: str | Task, background: bool) -> Future:
        """The future of a task's prefix; a name is resolved here, a `Task` (resolved by whoever
        took the request, e.g. Service.task_of) is not resolved again."""
        if not isinstance(task, Task):
            task = self.tasks.task(task)
        return self.loader.load(task.key, lambda: self._compile(task), background=background)

    def _compile(self, task: Task):
        """The task's prefix, carrying its off-task summary (`.offtask`, or None) when the engine
        guards: read once per load, beside the loop, and evicted with the prefix."""
        prefix = compile_task(task, self.model)
        if self.off_task is not None:
            try:
                prefix.offtask = self._summary(task)
            except AttributeError:  # a prefix type that takes no attributes: unguarded
                pass
        return prefix

    def _summary(self, task: Task):
        """The task's off-task summary for this model, or None (no summary, or one that does not
        fit: logged, and the task serves unguarded rather than not at all)."""
        from softprompt.io.offtask import read_summary

        try:
            summary = read_summary(task.source, task.card)
        except Exception as e:  # noqa: BLE001 - damaged, unreadable, a remote store away: the guard's loss only
            log.warning("task %s: its off-task summary cannot be read (%s); serving it unguarded", task.name, e)
            return None
        if summary is None:
            return None
        d, depth = getattr(self.model.config, "hidden_size", None), self.guard_depth
        if (d is not None and summary.hidden_size != d) or (depth is not None and summary.layer > depth):
            log.warning("task %s: its off-task summary (layer %d, width %d) does not fit this model; serving it "
                        "unguarded", task.name, summary.layer, summary.hidden_size)
            return None
        return summary

    def _take_ready(self, n: int) -> list[tuple[Handle, Request]]:
        """Pop up to `n` waiting requests that can join the batch now, oldest first (caller holds _lock).

        While rows are running, a request whose task prefix is not in memory stays queued while the
        loader thread reads it, and later requests pass it: a cold task never stalls a running row.
        Only the first `n + max_batch_size` waiting requests are looked at; their loads start here,
        even with no free slot (a prefetch), so a task is usually ready by the time a slot frees.
        With no row running there is nothing to stall, and requests are taken in order, their tasks
        loaded in `_prepare_common`."""
        if not self._rows:
            taken = [self._waiting.popleft() for _ in range(min(n, len(self._waiting)))]
        else:
            taken, keep, window = [], deque(), n + self.max_batch_size
            while self._waiting and len(taken) + len(keep) < window:
                handle, req = self._waiting.popleft()
                fut = None if req.task is None else self._load_of(req)
                if len(taken) < n and (fut is None or fut.done()):
                    taken.append((handle, req))
                else:
                    keep.append((handle, req))
            keep.extend(self._waiting)  # the rest, untouched: a long queue costs no scan per step
            self._waiting = keep
        if len(self._loads) > len(self._waiting) + len(taken):  # drop loads of requests cancelled meanwhile
            live = {id(req): req for _, req in (*self._waiting, *taken)}
            self._loads = {k: v for k, v in self._loads.items() if live.get(k) is v[0]}
        return taken

    def _load_of(self, req: Request) -> Future:
        """The future of a waiting request's task prefix, its load started if need be."""
        slot = self._loads.get(id(req))
        if slot is not None and slot[0] is req:
            return slot[1]
        try:
            fut = self._load_task(req.resolved or req.task, background=True)
        except Exception as e:  # noqa: BLE001 - an unknown task: the request's own error, raised when taken
            fut = done_future(error=e)
        self._loads[id(req)] = (req, fut)
        return fut

    def _cancel_waiting(self) -> None:
        """Finish the waiting requests whose clients cancelled them (caller holds _lock)."""
        if any(h.cancelled for h, _ in self._waiting):
            for h, req in [w for w in self._waiting if w[0].cancelled]:
                self.stats["cancelled"] += 1
                h._finish(Completion(request_id=req.request_id, task=req.task, text="", token_ids=[],
                                     finish_reason="cancelled", prompt_tokens=0))
            self._waiting = deque(w for w in self._waiting if not w[0].cancelled)

    # ---- tokens out ---------------------------------------------------------------------
    def _emit(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, stream it, and finish rows that are done. logits: (B, V).
        Returns the picked tokens."""
        greedy = greedy_ids(logits)
        picked = []
        for i, r in enumerate(rows):
            try:
                picked.append(self._emit_row(r, logits, i, greedy[i]))
            except RequestError as e:  # the request's own constraints cannot be met (a 400): it alone ends
                self._fail(r.handle, e)
                picked.append(greedy[i])
            except Exception as e:  # this row's sampling or decoding failed: it alone ends
                log.exception("emitting a token failed")
                self._fail(r.handle, fault("picking or decoding a token", e))
                picked.append(greedy[i])
        return picked

    def _emit_row(self, r: Row, logits: torch.Tensor, i: int, greedy: int) -> int:
        """One row's token: pick it, stream the text it completes, finish the row when done."""
        if r.logits is not None:
            r.logits.append(logits[i].detach().clone())
        row = logits[i:i + 1]
        allowed = r.matcher.allowed() if r.matcher is not None else None
        if r.params.penalized or allowed is not None:  # they move the argmax too
            row = penalize(row, r.ids, r.params, r.prompt_ids, self.eos, allowed)
            greedy = greedy_ids(row)[0]
        tok = greedy if r.params.greedy else int(pick_next(row, r.params, r.gen)[0])
        if r.matcher is not None:
            r.matcher.accept(tok)  # RequestError when the other constraints left no token the grammar allows
        lp = None
        if r.logprobs is not None:  # the model's own distribution: the logits before any penalty
            lp = TokenLogprob(tok, *token_logprobs(logits[i], tok, r.handle.request.logprobs))
            r.logprobs.append(lp)
        r.ids.append(tok)
        self.stats["generated_tokens"] += 1
        p, reason = r.params, None
        grammar_done = r.matcher is not None and r.matcher.done
        if (not p.ignore_eos and tok in self.eos) or tok in p.stop_token_ids or grammar_done:
            reason = "stop"  # EOS, a stop token (kept, as vLLM keeps it), or a complete grammar
        text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
        longest = max(map(len, p.stop), default=0)
        if p.stop and len(r.ids) < p.min_tokens:  # no stop string yet; the first look starts just before here
            r.stop_from = max(0, len(text) - longest + 1)
        elif p.stop:
            cut, hit = cut_at_stop(text[r.stop_from:], p.stop, p.include_stop_str_in_output)
            text, reason = text[:r.stop_from] + cut, "stop" if hit else reason
        if reason is None and len(r.ids) >= p.max_new_tokens:
            reason = "length"
        if reason:
            ready = len(text)
        else:  # hold back a split multi-byte character and what could begin a stop string (unless kept)
            ready = len(text.rstrip("\ufffd"))
            if p.stop and not p.include_stop_str_in_output:
                ready = min(ready, len(text) - longest + 1)
        ready = max(ready, r.sent)
        r.handle._push(tok, text[r.sent:ready], lp)
        r.sent, r.text = ready, text
        if reason:
            r.handle._finish(self._completion(r, reason))
            self.stats["completed"] += 1
        return tok

    def _completion(self, r: Row, reason: str) -> Completion:
        req = r.handle.request
        return Completion(request_id=req.request_id, task=req.task, text=r.text, token_ids=list(r.ids),
                          finish_reason=reason, prompt_tokens=r.prompt_tokens,
                          logits=torch.stack(r.logits) if r.logits else None, logprobs=r.logprobs,
                          prompt_logprobs=r.handle.prompt_logprobs, off_task=r.handle.off_task)
