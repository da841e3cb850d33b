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

The off-task guard (`off_task=`, core/offtask.py): the prefill computes, for every admitted row,
the hidden states of its prompt under its own prefix; a hook reads them after the layer each
row's task summary names, and each row is scored against its own task's summary (a task without
one, or the bare model: no score). Reading changes nothing the model computes, so with "warn"
every token is what it would be unguarded. Past the threshold, "reject" ends the row before it
decodes (OffTaskRefused, a 4xx) and "base" re-prefills it without its prefix; the rows kept are
cut out of the prefill's cache (the same rows, the same numbers).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import SimpleNamespace

import torch

from softprompt import hf
from softprompt.core.offtask import POLICIES, pool
from softprompt.hf.prefix import prefixed_forward
from softprompt.loops.generate import token_logprobs
from softprompt.serve.base import BaseEngine, OffTaskRefused, Row, fault, log
from softprompt.serve.handle import Completion, Handle, Request, TokenLogprob
from softprompt.serve.tasks import RequestError, TaskRegistry


class _Row(Row):
    __slots__ = ("pos", "guard")

    def __init__(self, handle: Handle, params, prompt_ids: list[int], matcher=None):
        super().__init__(handle, params, len(prompt_ids), prompt_ids, matcher)  # repetition penalty: the prompt too
        self.pos = 0  # position of the last token fed to the model
        self.guard = None  # the task's off-task summary, when the engine guards and the task has one


class Engine(BaseEngine):
    """Continuous-batching generation over one frozen model and many prompt tasks.

    model, tokenizer: from `load_base()`; tasks: a TaskRegistry or a {name: artifact path} map.
    Limits as in `BaseEngine`; `keep_logits` keeps each row's logits (for tests and scoring).
    `off_task`: None (no guard: no hook, no score) or the policy past a task's threshold, "warn"
    (score only), "reject" or "base" (see the module docstring); every guarded row's verdict is
    `handle.off_task` from admission on, and `Completion.off_task`.
    """

    prompt_logprobs = True
    guards_off_task = True  # accepts `off_task=` (the seq2seq engine does not)

    def __init__(self, model, tokenizer, tasks: TaskRegistry | Mapping | None = None, *, max_batch_size: int = 32,
                 max_queue: int = 1024, max_new_tokens_limit: int = 2048, prefix_cache_bytes: int = 256 * 2**20,
                 keep_logits: bool = False, off_task: str | None = None):
        if off_task is not None and off_task not in POLICIES:
            raise ValueError(f"off_task must be None or one of {', '.join(POLICIES)}, got {off_task!r}")
        super().__init__(model, tokenizer, tasks, max_batch_size=max_batch_size, max_queue=max_queue,
                         max_new_tokens_limit=max_new_tokens_limit, prefix_cache_bytes=prefix_cache_bytes)
        self.keep_logits = keep_logits
        self.off_task = off_task
        if off_task is not None:
            self.guard_depth = len(hf.decoder_layers(model))
        self.stats.update(off_task_scored=0, off_task_flagged=0, off_task_seconds=0.0)  # seconds: the guard's own work
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
        layers = {r.guard.layer for r, _, _ in new if r.guard is not None}
        with hf.layer_outputs(self.model, layers) as states:  # no guarded row: no hook
            out = self._prefill(new)
        if out is None:
            return
        if states:
            t0 = time.perf_counter()
            new, out, bare = self._guard(new, out, states)
            self.stats["off_task_seconds"] += time.perf_counter() - t0
            if bare:  # policy "base": these rows again, without their prefix
                self._join(bare, self._prefill(bare))
        self._join(new, out)

    def _prefill(self, new: list):
        """One forward pass over admitted (row, ids, kv) triples, left-padded; None if it failed (the
        rows then end with the error: they had not joined the batch)."""
        if not new:
            return None
        T = max(len(ids) for _, ids, _ in new)
        ids = torch.zeros(len(new), T, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(new), T, dtype=torch.long, device=self.device)
        for i, (_, row_ids, _) in enumerate(new):
            ids[i, T - len(row_ids):] = torch.tensor(row_ids)
            mask[i, T - len(row_ids):] = 1
        scored = any(r.handle.request.prompt_logprobs for r, _, _ in new)
        try:  # every position's logits only when a row asked for its prompt's logprobs
            return prefixed_forward(self.model, ids, mask, [kv for _, _, kv in new], use_cache=True,
                                    logits_to_keep=0 if scored else 1, growing=True)
        except Exception as e:  # the prefill of these rows failed before they joined the batch: they alone end
            for r, _, _ in new:
                self._fail(r.handle, fault("the prefill", e))
            return None

    def _join(self, new: list, out) -> None:
        """Prefilled rows join the running batch and make their first token."""
        if out is None or not new:
            return
        rows = [r for r, _, _ in new]
        for r, p in zip(rows, out.position_ids[:, -1].tolist()):
            r.pos = p
        for i, (r, ids, _) in enumerate(new):
            if r.handle.request.prompt_logprobs:
                r.handle.prompt_logprobs = _prompt_logprobs(out.logits[i], ids, r.handle.request.logprobs)
        self._merge(rows, out.cache, out.attention_mask)
        self._emit(rows, out.logits[:, -1])
        self._compact()

    def _guard(self, new: list, out, states: dict):
        """Score each guarded row against its own task's summary from the prefill's `states`
        ({layer: (B, T, d)}, the prompt's tokens only, left-padded) and act on the verdicts.
        Returns (rows kept, their prefill, rows to serve bare): the prefill cut to the kept rows."""
        keep, bare = [], []
        for i, (r, ids, kv) in enumerate(new):
            if r.guard is None:
                keep.append(i)
                continue
            try:
                pooled = pool(states[r.guard.layer][i:i + 1], [len(ids)])  # (1, d): this row's own tokens
                verdict = r.guard.judge(float(r.guard.score(pooled)[0]), self.off_task)
            except Exception:  # noqa: BLE001 - a guard that cannot score leaves the row served, unguarded
                log.exception("scoring a row against its off-task summary failed")
                keep.append(i)
                continue
            r.handle.off_task = verdict
            self.stats["off_task_scored"] += 1
            self.stats["off_task_flagged"] += verdict.off_task
            if verdict.action == "reject":
                self._refuse(r.handle, verdict)
            elif verdict.action == "base":
                bare.append((r, ids, None))
            else:
                keep.append(i)
        if len(keep) == len(new):
            return new, out, bare
        if not keep:
            return [], None, bare
        idx = torch.tensor(keep, device=self.device)
        mask = out.attention_mask.index_select(0, idx)
        first = int(mask.any(0).float().argmax())  # the first slot a kept row uses
        cut = SimpleNamespace(cache=hf.select(out.cache, idx, first), attention_mask=mask[:, first:],
                              logits=out.logits.index_select(0, idx), position_ids=out.position_ids.index_select(0, idx))
        return [new[i] for i in keep], cut, bare

    def _refuse(self, handle: Handle, verdict) -> None:
        """End an off-task request before it decodes (policy "reject"), its verdict on the result."""
        error = OffTaskRefused(f"the prompt is off this task's inputs: off-task score {verdict.score:.4g} is past the "
                               f"task's threshold {verdict.threshold:.4g} (calibrated on its held-out inputs); "
                               "send it to the base model or the task it belongs to")
        self.stats["errors"] += 1
        done = Completion.failed(handle.request, error)
        done.off_task = verdict
        handle._finish(done)

    def _prepare(self, handle: Handle, req: Request):
        params, prefix, ids = self._prepare_common(req, add_special_tokens=False)
        kv = None if prefix is None else prefix.kv()  # the plain (L, 2, H_kv, P, D) tensor the batch reads
        P = 0 if kv is None else kv.shape[3]
        if self.max_positions and P + len(ids) + params.max_new_tokens > self.max_positions:
            raise RequestError(f"prompt of {len(ids)} tokens + prefix of {P} + max_new_tokens "
                               f"{params.max_new_tokens} exceeds the model's context of {self.max_positions}",
                               code="prompt_too_long")
        row = _Row(handle, params, ids, self._matcher(req))
        row.guard = getattr(prefix, "offtask", None) if self.off_task is not None else None
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
