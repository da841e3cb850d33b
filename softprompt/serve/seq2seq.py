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
cross-attention prefixes (softprompt/families/seq2seq/core.py, as in softprompt/families/seq2seq/generate.py).
Each row streams its text as it is made and leaves the batch as soon as it finishes or is
cancelled (the batch tensors are cut down to the rows left). Requests that arrive meanwhile wait
for the next batch. A row's tokens equal the same request run alone (greedy; sampled rows with a
`seed` draw from their own generator), whatever else is in its batch.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from softprompt import hf
from softprompt.families.seq2seq.core import Seq2SeqBatchPrefix, Seq2SeqPrefix, decode, encode, is_seq2seq, make_cache
from softprompt.families.seq2seq.generate import decoder_start_id
from softprompt.loops.generate import SamplingParams
from softprompt.serve.base import BaseEngine, Row, fault
from softprompt.serve.handle import Completion, Handle, Request
from softprompt.serve.tasks import RequestError, TaskRefused, TaskRegistry


class _Row(Row):
    __slots__ = ("src", "prefix")

    def __init__(self, handle: Handle, params: SamplingParams, src: list[int], prefix: Seq2SeqPrefix | None,
                 matcher=None):
        # the repetition penalty counts the generated tokens only: the prompt is the encoder's input, not
        # tokens the decoder has seen
        super().__init__(handle, params, len(src), (), matcher)
        self.src, self.prefix = src, prefix


class Seq2SeqEngine(BaseEngine):
    """Batched generation over one frozen encoder-decoder model and many seq2seq prompt tasks.

    model, tokenizer: from `load_base(T5_OR_BART_DIR)`; tasks: a TaskRegistry or {name: artifact}.
    Same limits as `Engine`: `max_batch_size`, `max_queue`, `max_new_tokens_limit`,
    `prefix_cache_bytes`. Prompts are tokenized with the tokenizer's special tokens (T5 and BART
    expect them; `softprompt.families.seq2seq.generate.generate` and training do the same)."""

    thread_name = "softprompt-seq2seq-engine"

    def __init__(self, model, tokenizer, tasks: TaskRegistry | Mapping | None = None, *, max_batch_size: int = 32,
                 max_queue: int = 1024, max_new_tokens_limit: int = 2048, prefix_cache_bytes: int = 256 * 2**20):
        if not is_seq2seq(model):
            raise ValueError(f"{type(model).__name__} is not an encoder-decoder model: use softprompt.serve.Engine")
        super().__init__(model, tokenizer, tasks, max_batch_size=max_batch_size, max_queue=max_queue,
                         max_new_tokens_limit=max_new_tokens_limit, prefix_cache_bytes=prefix_cache_bytes)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)  # BART; T5 is relative
        self.start_id = decoder_start_id(model)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(model.config, "pad_token_id", None) or 0)
        self._run_lock = threading.Lock()  # one batch at a time

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
                except Exception as e:  # e.g. a task whose artifact breaks its loader: this request alone ends
                    self._fail(handle, fault("preparing the request", e))
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
        params, prefix, ids = self._prepare_common(req, add_special_tokens=True)
        prefix = None if prefix is None else prefix.kv()  # the parts the batch reads
        if prefix is not None and not isinstance(prefix, Seq2SeqPrefix):  # compile_task checks; a backstop
            raise TaskRefused(f"task {req.task!r} is not a prompt for an encoder-decoder model")
        if self.max_positions:
            P_enc = 0 if prefix is None or prefix.embeds is None else prefix.embeds.shape[0]
            P_dec = 0 if prefix is None or prefix.decoder is None else prefix.decoder.shape[3]
            if P_enc + len(ids) > self.max_positions or P_dec + params.max_new_tokens > self.max_positions:
                raise RequestError(f"prompt of {len(ids)} tokens + soft prompt of {P_enc} (encoder), or "
                                   f"max_new_tokens {params.max_new_tokens} + decoder prefix of {P_dec}, exceeds the "
                                   f"model's {self.max_positions} positions", code="prompt_too_long")
        self.stats["prompt_tokens"] += len(ids)
        return _Row(handle, params, ids, prefix, self._matcher(req))

    def _run(self, rows: list[_Row]):
        B, S = len(rows), max(len(r.src) for r in rows)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(B, S, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):  # right-padded, as load_base's seq2seq tokenizer pads
            ids[i, : len(r.src)] = torch.tensor(r.src)
            mask[i, : len(r.src)] = 1
        bp = Seq2SeqBatchPrefix.build([r.prefix for r in rows], B)
        hidden, mask = encode(self.model, ids, mask, bp)
        cache = make_cache(self.model, bp, hidden, growing=True)
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
            cache = out.cache
            self.stats["steps"] += 1
            self.stats["batch_rows_sum"] += B
            nxt = self._emit(rows, out.logits[:, -1])


def _select(keep: list[int], bp: Seq2SeqBatchPrefix, hidden, mask, cache):
    """The batch cut down to rows `keep`: encoder states, prefixes (decoder and cross; the encoder's
    and the soft prompts are spent) and both halves of the cache."""
    idx = torch.tensor(keep, device=hidden.device)

    def part(p):  # (kv (L, 2, B, H, P, D) or None, mask (B, P))
        kv, m = p
        return (None if kv is None else kv.index_select(2, idx.to(kv.device)), m.index_select(0, idx.to(m.device)))

    bp = Seq2SeqBatchPrefix(embeds=[bp.embeds[i] for i in keep], encoder=(None, bp.encoder[1][keep]),
                            decoder=part(bp.decoder), cross=part(bp.cross))
    return bp, hidden.index_select(0, idx), mask.index_select(0, idx), hf.encdec_select(cache, idx)
