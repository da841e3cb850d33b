"""The serving engine: one frozen model, many tasks, mixed in one batch, continuous batching.

Every running row carries its own KV prefix (a task's, or none for the bare model); rows of
different tasks, prefix lengths and methods share each forward pass. The batch's KV cache is one
left-padded tensor per layer:

    slots of row i:  [ pad ... | prefix_i | prompt_i | generated_i ]      mask 0 over pad
    positions:                   (n/a)      P_i, P_i+1, ...

Each `step()` (1) decodes one token for every running row in one forward pass, (2) admits
waiting requests up to `max_batch_size`: prefills them together (their own prefixes, left-padded)
and merges them into the batch by left-padding whichever cache is shorter, (3) drops finished
rows at once and trims all-pad columns on the left. A row's result is the same as running it
alone: pad slots are masked out, and positions come from each row's own count.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping

import torch
from transformers import DynamicCache

from ..generate import SamplingParams, eos_ids, pick_next
from ..prefix import GrowingCache, prefixed_forward
from .handle import Completion, Handle, Request
from .tasks import PrefixCache, QueueFull, RequestError, TaskRegistry, compile_task


class _Row:
    __slots__ = ("handle", "params", "gen", "ids", "pos", "text", "sent", "prompt_tokens", "logits")

    def __init__(self, handle: Handle, params: SamplingParams, prompt_tokens: int):
        self.handle, self.params, self.prompt_tokens = handle, params, prompt_tokens
        self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                 else int(torch.randint(0, 2**62, (1,))))
        self.ids: list[int] = []
        self.pos = 0  # position of the last token fed to the model
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.logits: list[torch.Tensor] | None = None


class Engine:
    """Continuous-batching generation over one frozen model and many prompt tasks.

    model, tokenizer: from `load_base()`; tasks: a TaskRegistry or a {name: artifact path} map.
    Limits (all with defaults): `max_batch_size` rows decode together, `max_queue` requests may
    wait (more are refused with QueueFull), `max_new_tokens_limit` caps a request,
    `prefix_cache_bytes` bounds the compiled prefixes kept in memory.
    """

    def __init__(self, model, tokenizer, tasks: TaskRegistry | Mapping | None = None, *, max_batch_size: int = 32,
                 max_queue: int = 1024, max_new_tokens_limit: int = 2048, prefix_cache_bytes: int = 256 * 2**20,
                 keep_logits: bool = False):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.tasks = tasks if isinstance(tasks, TaskRegistry) else TaskRegistry(tasks)
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.max_batch_size, self.max_queue, self.max_new_tokens_limit = max_batch_size, max_queue, max_new_tokens_limit
        self.keep_logits = keep_logits
        cfg = model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.eos = eos_ids(tokenizer, model)
        self.device = next(model.parameters()).device
        self._waiting: deque[tuple[Handle, Request]] = deque()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, S)
        self._lock = threading.Lock()  # guards _waiting and step()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"requests": 0, "completed": 0, "errors": 0, "cancelled": 0, "refused_queue_full": 0,
                      "generated_tokens": 0, "prompt_tokens": 0, "steps": 0, "batch_rows_sum": 0}

    # ---- public API ---------------------------------------------------------------------
    def add_task(self, name: str, source) -> None:
        """Register (or replace) a task; the cache is keyed by source, so a replaced task is never stale."""
        self.tasks.add(name, source)

    def submit(self, request: Request) -> Handle:
        """Queue a request; returns its handle at once. Raises QueueFull when the queue is at its limit."""
        handle = Handle(request, self)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self.stats["refused_queue_full"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later",
                                retry_after=1.0)
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

    def start(self) -> "Engine":
        """Run the step loop in a background thread (for servers and streaming)."""
        if not self.running:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
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

    # ---- one iteration ------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """One decoding step for running rows plus admission of waiting ones. False if idle."""
        with self._lock:
            self._drop_cancelled()
            if not self._rows and not self._waiting:
                return False
            if self._rows:
                self._decode()
            self._admit()
            if self._rows:
                self.stats["steps"] += 1
                self.stats["batch_rows_sum"] += len(self._rows)
            return True

    def _decode(self):
        rows, B = self._rows, len(self._rows)
        last = torch.tensor([r.ids[-1] for r in rows], device=self.device).view(B, 1)
        pos = torch.tensor([r.pos + 1 for r in rows], device=self.device).view(B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], dim=1)
        out = self.model(input_ids=last, attention_mask=self._mask, position_ids=pos, past_key_values=self._cache,
                         use_cache=True, logits_to_keep=1)
        self._cache = out.past_key_values
        for r in rows:
            r.pos += 1
        self._emit(rows, out.logits[:, -1])
        self._compact()

    def _admit(self):
        free = self.max_batch_size - len(self._rows)
        new: list[tuple[_Row, list[int], torch.Tensor | None]] = []
        while free > 0 and self._waiting:
            handle, req = self._waiting.popleft()
            try:
                new.append(self._prepare(handle, req))
                free -= 1
            except RequestError as e:
                self.stats["errors"] += 1
                handle._finish(Completion.failed(req, e))
        if not new:
            return
        T = max(len(ids) for _, ids, _ in new)
        ids = torch.zeros(len(new), T, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(new), T, dtype=torch.long, device=self.device)
        for i, (_, row_ids, _) in enumerate(new):
            ids[i, T - len(row_ids):] = torch.tensor(row_ids)
            mask[i, T - len(row_ids):] = 1
        out = prefixed_forward(self.model, ids, mask, [kv for _, _, kv in new], use_cache=True, logits_to_keep=1,
                              cache_cls=GrowingCache)
        rows = [r for r, _, _ in new]
        for r, p in zip(rows, out.position_ids[:, -1].tolist()):
            r.pos = p
        self._merge(rows, out.past_key_values, out.attention_mask)
        self._emit(rows, out.logits[:, -1])
        self._compact()

    def _prepare(self, handle: Handle, req: Request):
        params = req.sampling()
        if params.max_new_tokens > self.max_new_tokens_limit:
            raise RequestError(f"max_new_tokens {params.max_new_tokens} is over this engine's limit "
                               f"{self.max_new_tokens_limit}")
        kv = None
        if req.task is not None:
            source = self.tasks.resolve(req.task)
            # keyed by what the name resolves to now, so a new version in the store is served at once
            key = f"{req.task}:{id(source)}" if isinstance(source, torch.nn.Module) else f"{req.task}:{source}"
            kv = self.prefixes.get(key, lambda: compile_task(req.task, source, self.model))
        ids = list(req.prompt_ids) if req.prompt_ids is not None else \
            self.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError("the prompt is empty")
        P = 0 if kv is None else kv.shape[3]
        if self.max_positions and P + len(ids) + params.max_new_tokens > self.max_positions:
            raise RequestError(f"prompt of {len(ids)} tokens + prefix of {P} + max_new_tokens "
                               f"{params.max_new_tokens} exceeds the model's context of {self.max_positions}",
                               code="prompt_too_long")
        row = _Row(handle, params, len(ids))
        if self.keep_logits:
            row.logits = []
        self.stats["prompt_tokens"] += len(ids)
        return row, ids, kv

    # ---- batch bookkeeping --------------------------------------------------------------
    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor):
        """Append prefilled rows to the running batch, left-padding the shorter cache."""
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        S_old, S_new = self._mask.shape[1], mask.shape[1]
        S = max(S_old, S_new)
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            k = torch.cat([_lpad(old.keys, S), _lpad(new.keys, S)], dim=0)  # (B, H, S, D)
            v = torch.cat([_lpad(old.values, S), _lpad(new.values, S)], dim=0)
            layers.append((k, v))
        self._cache = _cache_from(layers)
        self._mask = torch.cat([_lpad_mask(self._mask, S), _lpad_mask(mask, S)], dim=0)
        self._rows = self._rows + rows

    def _compact(self):
        """Drop finished rows and the left columns that are padding for every remaining row."""
        keep = [i for i, r in enumerate(self._rows) if not r.handle.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, idx)
        first = int(mask.any(0).float().argmax())  # first column any remaining row uses
        self._mask = mask[:, first:]
        self._cache = _cache_from([(l.keys.index_select(0, idx)[:, :, first:], l.values.index_select(0, idx)[:, :, first:])
                                   for l in self._cache.layers])
        self._rows = [self._rows[i] for i in keep]

    def _drop_cancelled(self):
        for r in self._rows:
            if r.handle.cancelled and not r.handle.done:
                self.stats["cancelled"] += 1
                r.handle._finish(self._completion(r, "cancelled"))
        self._compact()
        if any(h.cancelled for h, _ in self._waiting):
            for h, req in [w for w in self._waiting if w[0].cancelled]:
                self.stats["cancelled"] += 1
                h._finish(Completion(request_id=req.request_id, task=req.task, text="", token_ids=[],
                                     finish_reason="cancelled", prompt_tokens=0))
            self._waiting = deque(w for w in self._waiting if not w[0].cancelled)

    # ---- tokens out ---------------------------------------------------------------------
    def _emit(self, rows: list[_Row], logits: torch.Tensor):
        """Pick each row's next token, stream it, and finish rows that are done. logits: (B, V)."""
        greedy = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.logits is not None:
                r.logits.append(logits[i].detach().clone())
            tok = greedy[i] if r.params.greedy else int(pick_next(logits[i:i + 1], r.params, r.gen)[0])
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

    def _completion(self, r: _Row, reason: str) -> Completion:
        req = r.handle.request
        return Completion(request_id=req.request_id, task=req.task, text=r.text, token_ids=list(r.ids),
                          finish_reason=reason, prompt_tokens=r.prompt_tokens,
                          logits=torch.stack(r.logits) if r.logits else None)


def _lpad(t: torch.Tensor, S: int) -> torch.Tensor:
    """Left-pad a (B, H, s, D) cache tensor with zeros to S slots."""
    s = t.shape[2]
    if s == S:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], S - s, t.shape[3]), t], dim=2)


def _lpad_mask(m: torch.Tensor, S: int) -> torch.Tensor:
    return m if m.shape[1] == S else torch.cat([m.new_zeros(m.shape[0], S - m.shape[1]), m], dim=1)


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = GrowingCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache
