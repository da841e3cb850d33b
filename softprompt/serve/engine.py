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

from collections.abc import Mapping

import torch

from softprompt import hf
from softprompt.hf.prefix import prefixed_forward
from softprompt.loops.generate import token_logprobs
from softprompt.serve.base import BaseEngine, Row, fault
from softprompt.serve.handle import Handle, Request, TokenLogprob
from softprompt.serve.tasks import RequestError, TaskRegistry


class _Row(Row):
    __slots__ = ("pos",)

    def __init__(self, handle: Handle, params, prompt_ids: list[int], matcher=None):
        super().__init__(handle, params, len(prompt_ids), prompt_ids, matcher)  # repetition penalty: the prompt too
        self.pos = 0  # position of the last token fed to the model


class Engine(BaseEngine):
    """Continuous-batching generation over one frozen model and many prompt tasks.

    model, tokenizer: from `load_base()`; tasks: a TaskRegistry or a {name: artifact path} map.
    Limits as in `BaseEngine`; `keep_logits` keeps each row's logits (for tests and scoring).
    """

    prompt_logprobs = True

    def __init__(self, model, tokenizer, tasks: TaskRegistry | Mapping | None = None, *, max_batch_size: int = 32,
                 max_queue: int = 1024, max_new_tokens_limit: int = 2048, prefix_cache_bytes: int = 256 * 2**20,
                 keep_logits: bool = False):
        super().__init__(model, tokenizer, tasks, max_batch_size=max_batch_size, max_queue=max_queue,
                         max_new_tokens_limit=max_new_tokens_limit, prefix_cache_bytes=prefix_cache_bytes)
        self.keep_logits = keep_logits
        cfg = model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self._cache = None  # the running batch's cache (an opaque hf handle)
        self._mask: torch.Tensor | None = None  # (B, S)

    # ---- one iteration ------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """One decoding step for running rows plus admission of waiting ones. False if idle."""
        with self._step_lock:  # the queue's lock is held only to look at or pop the queue
            self._drop_cancelled()
            with self._lock:
                idle = not self._rows and not self._waiting
            if idle:
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
        out = hf.forward(self.model, self._cache, input_ids=last, attention_mask=self._mask, position_ids=pos,
                         use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        for r in rows:
            r.pos += 1
        self._emit(rows, out.logits[:, -1])
        self._compact()

    def _admit(self):
        free = self.max_batch_size - len(self._rows)
        new: list[tuple[_Row, list[int], torch.Tensor | None]] = []
        with self._lock:
            ready = self._take_ready(free)  # a task still loading waits; loads start even with no free slot
        while ready:
            for handle, req in ready:
                try:
                    new.append(self._prepare(handle, req))
                    free -= 1
                except RequestError as e:
                    self._fail(handle, e)
                except Exception as e:  # e.g. a task whose artifact breaks its loader: this request alone ends
                    self._fail(handle, fault("preparing the request", e))
            with self._lock:
                ready = self._take_ready(free) if free > 0 else []
        if not new:
            return
        T = max(len(ids) for _, ids, _ in new)
        ids = torch.zeros(len(new), T, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(new), T, dtype=torch.long, device=self.device)
        for i, (_, row_ids, _) in enumerate(new):
            ids[i, T - len(row_ids):] = torch.tensor(row_ids)
            mask[i, T - len(row_ids):] = 1
        rows = [r for r, _, _ in new]
        scored = [i for i, r in enumerate(rows) if r.handle.request.prompt_logprobs]
        try:  # every position's logits only when a row asked for its prompt's logprobs
            out = prefixed_forward(self.model, ids, mask, [kv for _, _, kv in new], use_cache=True,
                                   logits_to_keep=0 if scored else 1, growing=True)
        except Exception as e:  # the prefill of these rows failed before they joined the batch: they alone end
            for r in rows:
                self._fail(r.handle, fault("the prefill", e))
            return
        for r, p in zip(rows, out.position_ids[:, -1].tolist()):
            r.pos = p
        for i in scored:
            rows[i].handle.prompt_logprobs = _prompt_logprobs(out.logits[i], new[i][1], rows[i].handle.request.logprobs)
        self._merge(rows, out.cache, out.attention_mask)
        self._emit(rows, out.logits[:, -1])
        self._compact()

    def _prepare(self, handle: Handle, req: Request):
        params, prefix, ids = self._prepare_common(req, add_special_tokens=False)
        kv = None if prefix is None else prefix.kv()  # the plain (L, 2, H_kv, P, D) tensor the batch reads
        P = 0 if kv is None else kv.shape[3]
        if self.max_positions and P + len(ids) + params.max_new_tokens > self.max_positions:
            raise RequestError(f"prompt of {len(ids)} tokens + prefix of {P} + max_new_tokens "
                               f"{params.max_new_tokens} exceeds the model's context of {self.max_positions}",
                               code="prompt_too_long")
        row = _Row(handle, params, ids, self._matcher(req))
        if self.keep_logits:
            row.logits = []
        self.stats["prompt_tokens"] += len(ids)
        return row, ids, kv

    # ---- batch bookkeeping --------------------------------------------------------------
    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask = [], None, None

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor):
        """Append prefilled rows to the running batch, left-padding the shorter cache."""
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        S = max(self._mask.shape[1], mask.shape[1])
        self._cache = hf.concat(self._cache, cache)
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
        self._cache = hf.select(self._cache, idx, first)
        self._rows = [self._rows[i] for i in keep]

    def _drop_cancelled(self):
        for r in self._rows:
            if r.handle.cancelled and not r.handle.done:
                self.stats["cancelled"] += 1
                r.handle._finish(self._completion(r, "cancelled"))
        self._compact()
        with self._lock:
            self._cancel_waiting()


def _prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int | None) -> list[TokenLogprob]:
    """Each prompt token's logprob given the tokens before it (and the prefix); the first has none.
    logits: (T, V) of the left-padded prefill row, so the prompt's own positions are its last len(ids)."""
    logits = logits[logits.shape[0] - len(ids):]
    return [TokenLogprob(ids[0], None)] + [TokenLogprob(t, *token_logprobs(logits[j], t, top or 0))
                                           for j, t in enumerate(ids[1:])]


def _lpad_mask(m: torch.Tensor, S: int) -> torch.Tensor:
    return m if m.shape[1] == S else torch.cat([m.new_zeros(m.shape[0], S - m.shape[1]), m], dim=1)
