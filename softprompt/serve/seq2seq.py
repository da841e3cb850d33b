"""The serving engine for encoder-decoder bases (T5, BART families), with `Engine`'s interface.

`Seq2SeqEngine` offers what the HTTP layer uses of `Engine`: `submit` (raises QueueFull past
`max_queue`), `generate`, `stream`, handles that stream and cancel, `start`/`stop`/`running`,
`status()` (the same counters, so /metrics and /health work unchanged), `tasks` (a TaskRegistry)
and `prefixes` (the same PrefixCache, holding one `Seq2SeqPrefix` per task, counted by the bytes
of its tensors). Errors stay with their request (`finish_reason="error"`, `error_code`
`unknown_task`, `task_refused`, `prompt_too_long`, `bad_request`), as in `Engine`.

Batching is simpler than `Engine`'s (no continuous batching): each `step()` takes up to
`max_batch_size` waiting requests, encodes them together (each row with its own task's soft
prompt and encoder prefix, or none), then decodes them together to the end, one token for
every unfinished row per forward pass, over a cache holding each row's decoder self- and
cross-attention prefixes (softprompt/seq2seq/core.py, as in softprompt/seq2seq/generate.py).
Each row streams its text as it is made and leaves the batch as soon as it finishes or is
cancelled (the batch tensors are cut down to the rows left). Requests that arrive meanwhile wait
for the next batch. A row's tokens equal the same request run alone (greedy; sampled rows with a
`seed` draw from their own generator), whatever else is in its batch.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping

import torch
from transformers import DynamicCache, EncoderDecoderCache

from ..generate import SamplingParams, eos_ids, pick_next
from ..prefix import GrowingCache
from ..seq2seq.core import Seq2SeqBatchPrefix, Seq2SeqPrefix, decode, encode, make_cache
from ..seq2seq.generate import decoder_start_id
from .handle import Completion, Handle, Request
from .tasks import PrefixCache, QueueFull, RequestError, TaskRefused, TaskRegistry, compile_task


class _Row:
    __slots__ = ("handle", "params", "gen", "ids", "text", "sent", "prompt_tokens", "src", "prefix")

    def __init__(self, handle: Handle, params: SamplingParams, src: list[int], prefix: Seq2SeqPrefix | None):
        self.handle, self.params, self.src, self.prefix = handle, params, src, prefix
        self.prompt_tokens = len(src)
        self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                 else int(torch.randint(0, 2**62, (1,))))
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed


class Seq2SeqEngine:
    """Batched generation over one frozen encoder-decoder model and many seq2seq prompt tasks.

    model, tokenizer: from `load_base(T5_OR_BART_DIR)`; tasks: a TaskRegistry or {name: artifact}.
    Same limits as `Engine`: `max_batch_size`, `max_queue`, `max_new_tokens_limit`,
    `prefix_cache_bytes`. Prompts are tokenized with the tokenizer's special tokens (T5 and BART
    expect them; `softprompt.seq2seq.generate.generate` and training do the same)."""

    def __init__(self, model, tokenizer, tasks: TaskRegistry | Mapping | None = None, *, max_batch_size: int = 32,
                 max_queue: int = 1024, max_new_tokens_limit: int = 2048, prefix_cache_bytes: int = 256 * 2**20):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        if not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is not an encoder-decoder model: use softprompt.serve.Engine")
        self.model, self.tokenizer = model, tokenizer
        self.tasks = tasks if isinstance(tasks, TaskRegistry) else TaskRegistry(tasks)
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.max_batch_size, self.max_queue, self.max_new_tokens_limit = max_batch_size, max_queue, max_new_tokens_limit
        self.max_positions = getattr(model.config, "max_position_embeddings", None)  # BART; T5 is relative
        self.eos = eos_ids(tokenizer, model)
        self.start_id = decoder_start_id(model)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(model.config, "pad_token_id", None) or 0)
        self.device = next(model.parameters()).device
        self._waiting: deque[tuple[Handle, Request]] = deque()
        self._rows: list[_Row] = []  # the batch being decoded (for status)
        self._lock = threading.Lock()  # guards _waiting
        self._run_lock = threading.Lock()  # one batch at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"requests": 0, "completed": 0, "errors": 0, "cancelled": 0, "refused_queue_full": 0,
                      "generated_tokens": 0, "prompt_tokens": 0, "steps": 0, "batch_rows_sum": 0}

    # ---- public API (as Engine) -----------------------------------------------------------
    def add_task(self, name: str, source) -> None:
        self.tasks.add(name, source)

    def submit(self, request: Request) -> Handle:
        """Queue a request; returns its handle at once. Raises QueueFull when the queue is at its limit."""
        handle = Handle(request, self)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self.stats["refused_queue_full"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later", retry_after=1.0)
            self._waiting.append((handle, request))
            self.stats["requests"] += 1
        self._wake.set()
        return handle

    def generate(self, requests: Iterable[Request]) -> list[Completion]:
        handles = [self.submit(r) for r in requests]
        return [h.result() for h in handles]

    def stream(self, request: Request):
        return iter(self.submit(request))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Seq2SeqEngine":
        if not self.running:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="softprompt-seq2seq-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background loop; rows of a batch still decoding finish as cancelled."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def status(self) -> dict:
        return {"running_rows": len(self._rows), "waiting": len(self._waiting), "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue, "prefix_cache": self.prefixes.stats(), **self.stats}

    def _loop(self):
        while not self._stop:
            if not self.step():
                self._wake.wait(0.05)
                self._wake.clear()

    # ---- one batch ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """Take up to max_batch_size waiting requests and run them to the end. False if idle."""
        with self._run_lock:
            with self._lock:
                taken = []
                while self._waiting and len(taken) < self.max_batch_size:
                    taken.append(self._waiting.popleft())
            if not taken:
                return False
            rows = []
            for handle, req in taken:
                if handle.cancelled:
                    self.stats["cancelled"] += 1
                    handle._finish(Completion(request_id=req.request_id, task=req.task, text="", token_ids=[],
                                              finish_reason="cancelled", prompt_tokens=0))
                    continue
                try:
                    rows.append(self._prepare(handle, req))
                except RequestError as e:
                    self.stats["errors"] += 1
                    handle._finish(Completion.failed(req, e))
            if rows:
                self._rows = rows
                try:
                    self._run(rows)
                except Exception as e:  # a fault in the model call: fail this batch, keep serving
                    for r in rows:
                        if not r.handle.done:
                            self.stats["errors"] += 1
                            r.handle._finish(Completion.failed(r.handle.request, RequestError(
                                f"generation failed: {type(e).__name__}: {e}", code="internal_error")))
                finally:
                    self._rows = []
            return True

    def _prepare(self, handle: Handle, req: Request) -> _Row:
        params = req.sampling()
        if params.max_new_tokens > self.max_new_tokens_limit:
            raise RequestError(f"max_new_tokens {params.max_new_tokens} is over this engine's limit "
                               f"{self.max_new_tokens_limit}")
        prefix = None
        if req.task is not None:
            source = self.tasks.resolve(req.task)
            key = f"{req.task}:{id(source)}" if isinstance(source, torch.nn.Module) else f"{req.task}:{source}"
            prefix = self.prefixes.get(key, lambda: compile_task(req.task, source, self.model))
            if not isinstance(prefix, Seq2SeqPrefix):  # compile_task checks families; this is a backstop
                raise TaskRefused(f"task {req.task!r} is not a prompt for an encoder-decoder model")
        ids = list(req.prompt_ids) if req.prompt_ids is not None else self.tokenizer(req.prompt)["input_ids"]
        if not ids:
            raise RequestError("the prompt is empty")
        if self.max_positions:
            P_enc = 0 if prefix is None or prefix.embeds is None else prefix.embeds.shape[0]
            P_dec = 0 if prefix is None or prefix.decoder is None else prefix.decoder.shape[3]
            if P_enc + len(ids) > self.max_positions or P_dec + params.max_new_tokens > self.max_positions:
                raise RequestError(f"prompt of {len(ids)} tokens + soft prompt of {P_enc} (encoder), or "
                                   f"max_new_tokens {params.max_new_tokens} + decoder prefix of {P_dec}, exceeds the "
                                   f"model's {self.max_positions} positions", code="prompt_too_long")
        self.stats["prompt_tokens"] += len(ids)
        return _Row(handle, params, ids, prefix)

    def _run(self, rows: list[_Row]):
        B, S = len(rows), max(len(r.src) for r in rows)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(B, S, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):  # right-padded, as load_base's seq2seq tokenizer pads
            ids[i, : len(r.src)] = torch.tensor(r.src)
            mask[i, : len(r.src)] = 1
        bp = Seq2SeqBatchPrefix.build([r.prefix for r in rows], B)
        hidden, mask = encode(self.model, ids, mask, bp)
        cache = make_cache(self.model, bp, hidden, GrowingCache)
        nxt = [self.start_id] * B
        while rows:
            if self._stop:
                for r in rows:
                    r.handle.cancel()
            for r in rows:
                if r.handle.cancelled and not r.handle.done:
                    self.stats["cancelled"] += 1
                    r.handle._finish(self._completion(r, "cancelled"))
            keep = [i for i, r in enumerate(rows) if not r.handle.done]
            if len(keep) < len(rows):
                if not keep:
                    break
                rows, nxt = [rows[i] for i in keep], [nxt[i] for i in keep]
                bp, hidden, mask, cache = _select(keep, bp, hidden, mask, cache)
                self._rows = rows
            B = len(rows)
            out = decode(self.model, bp, hidden, mask, torch.tensor(nxt, device=self.device).view(B, 1), cache=cache,
                         use_cache=True)
            cache = out.past_key_values
            self.stats["steps"] += 1
            self.stats["batch_rows_sum"] += B
            nxt = self._emit(rows, out.logits[:, -1])

    # ---- tokens out (as Engine._emit) -------------------------------------------------------
    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        picked = []
        for i, r in enumerate(rows):
            tok = greedy[i] if r.params.greedy else int(pick_next(logits[i:i + 1], r.params, r.gen)[0])
            picked.append(tok)
            r.ids.append(tok)
            self.stats["generated_tokens"] += 1
            reason = None
            if not r.params.ignore_eos and tok in self.eos:
                reason = "stop"
            text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
            if r.params.stop:
                hits = [h for h in (text.find(s) for s in r.params.stop) if h >= 0]
                if hits:
                    text, reason = text[:min(hits)], "stop"
            if reason is None and len(r.ids) >= r.params.max_new_tokens:
                reason = "length"
            if reason:
                ready = len(text)
            else:  # hold back a split multi-byte character and what could begin a stop string
                ready = len(text.rstrip("\ufffd"))
                if r.params.stop:
                    ready = min(ready, len(text) - max(len(s) for s in r.params.stop) + 1)
            ready = max(ready, r.sent)
            r.handle._push(tok, text[r.sent:ready])
            r.sent, r.text = ready, text
            if reason:
                r.handle._finish(self._completion(r, reason))
                self.stats["completed"] += 1
        return picked

    def _completion(self, r: _Row, reason: str) -> Completion:
        req = r.handle.request
        return Completion(request_id=req.request_id, task=req.task, text=r.text, token_ids=list(r.ids),
                          finish_reason=reason, prompt_tokens=r.prompt_tokens)


def _select(keep: list[int], bp: Seq2SeqBatchPrefix, hidden, mask, cache: EncoderDecoderCache):
    """The batch cut down to rows `keep`: encoder states, prefixes (decoder and cross; the encoder's
    and the soft prompts are spent) and both halves of the cache."""
    idx = torch.tensor(keep, device=hidden.device)

    def part(p):  # (kv (L, 2, B, H, P, D) or None, mask (B, P))
        kv, m = p
        return (None if kv is None else kv.index_select(2, idx.to(kv.device)), m.index_select(0, idx.to(m.device)))

    bp = Seq2SeqBatchPrefix(embeds=[bp.embeds[i] for i in keep], encoder=(None, bp.encoder[1][keep]),
                            decoder=part(bp.decoder), cross=part(bp.cross))
    self_cache, cross_cache = GrowingCache(), DynamicCache()
    for new, old in ((self_cache, cache.self_attention_cache), (cross_cache, cache.cross_attention_cache)):
        for layer, lay in enumerate(old.layers):
            new.update(lay.keys.index_select(0, idx), lay.values.index_select(0, idx), layer)
    return bp, hidden.index_select(0, idx), mask.index_select(0, idx), EncoderDecoderCache(self_cache, cross_cache)
