"""A vLLM V1 KV connector that serves our tasks: a task's compiled KV prefix written into the first
`P` slots of a request's paged KV blocks, so real tokens follow at positions P, P+1, ... exactly as
in our engine and PEFT (docs/vllm.md).

How a request meets its prefix:

    prompt token ids:  [ t_1 .. t_P placeholders of task@version | real prompt ... ]
    scheduler side:    get_num_new_matched_tokens -> "tokens [h, P) are computed externally"
                       (h: what vLLM's own prefix cache already holds, block-aligned)
    worker side:       start_load_kv, before the forward pass: for every attention layer l, the
                       prefix's keys kv[l, 0] and values kv[l, 1] for positions [h, P) go through
                       the attention backend's own `do_kv_cache_update` into the request's slots

The prefix's keys are stored as the attention sees them, after RoPE at positions 0..P-1 (see
softprompt/hf/prefix.py), which is also what vLLM keeps in its cache; vLLM computes the real tokens
from position P on. Writing through the backend's own cache writer (not into the cache tensor by
hand) keeps the layout right on every backend and ISA (the CPU backend's blocks are
[blocks, H_kv, block_size, 2 * D], packed by its kernel). Nothing here needs whole blocks: the
scheduler accepts any count of external tokens, and a partial last block is simply completed by
the real tokens computed in the same step.

Configuration (`--kv-transfer-config`, kv_connector_extra_config):
    store             the store's root directory, or a shared store's postgresql:// DSN whose bytes are
                      in a directory (?objects=DIR, or the store's recorded setting)
    base_fingerprint  the base model's fingerprint (`softprompt info`), the key of compiled prefixes
    dtype             optional: "float32", "bfloat16", ...; default the model's dtype
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from softprompt.vllm.tasks import PrefixDamaged, TaskIndex, VllmTask, read_prefix

logger = init_logger(__name__)
LAYER_INDEX = re.compile(r"\.(\d+)\.")  # "model.layers.7.self_attn.attn" -> 7
CACHE_BYTES = 1 << 30  # worker-side prefixes kept decoded in memory (LRU); a task is ~46 kB/token in float32


@dataclass(frozen=True)
class _Unservable:
    """A request for a task the connector cannot serve: one that names its task (kv_transfer_params
    {"softprompt": {"task", "sha256", "num_virtual_tokens"}}, as our server sends) not in the index
    for this base and dtype, or a task whose compiled file is damaged. Its `P` positions are claimed
    and reported as failed loads, so vLLM fails the request (kv_load_failure_policy "fail", its
    default) and evicts the blocks: the placeholders never run as ordinary tokens, whose keys and
    values vLLM's prefix cache would otherwise keep and serve to the task's next requests."""

    ref: str
    num_virtual_tokens: int
    why: str


@dataclass
class _Load:
    req_id: str
    task: VllmTask | _Unservable
    start: int  # first prefix position to write (those before it are in vLLM's prefix cache already)
    slots: list[int]  # slot of each position start..P-1


def _named(request) -> dict | None:
    """The task a request names in its kv_transfer_params, if any."""
    want = (getattr(request, "kv_transfer_params", None) or {}).get("softprompt")
    return want if isinstance(want, dict) else None


@dataclass
class SoftpromptMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SoftpromptConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        missing = [k for k in ("store", "base_fingerprint") if not extra.get(k)]
        if missing:
            raise ValueError(f"SoftpromptConnector needs kv_connector_extra_config {missing} (see docs/vllm.md)")
        model_config = vllm_config.model_config
        dtype = extra.get("dtype") or _dtype_name(model_config.dtype)
        self.block_size = vllm_config.cache_config.block_size
        self.index = TaskIndex(extra["store"], extra["base_fingerprint"], dtype, model_config.get_vocab_size())
        self._matched: dict[str, VllmTask | _Unservable] = {}  # scheduler: req_id -> its task, until allocated
        self._pending: dict[str, tuple[VllmTask | _Unservable, int]] = {}  # req_id -> (task, start), loaded next
        self._invalid: set[int] = set()  # worker: blocks whose load failed this step (vLLM fails their requests)
        self._prefixes: dict[str, torch.Tensor] = {}  # worker: kv_sha256 -> kv (L, 2, H, P, D), LRU order
        self._checked: set[str] = set()  # scheduler: kv_sha256 of compiled files read and hashed once
        self.stats = {"loaded_requests": 0, "loaded_tokens": 0, "cached_requests": 0, "failed_requests": 0}

    # ---- scheduler side ---------------------------------------------------------------------
    def _task_of(self, request) -> VllmTask | _Unservable | None:
        ids = request.prompt_token_ids or []
        task, want = self.index.match(ids), _named(request)
        if want is not None and (task is None or task.sha256 != want.get("sha256")):
            self.index.refresh()  # published a moment ago: do not wait for the periodic re-read
            task = self.index.match(ids)
            if task is None or task.sha256 != want.get("sha256"):
                P = want.get("num_virtual_tokens")
                if not isinstance(P, int) or not 0 < P < len(ids):
                    return None
                why = (f"task {want.get('task')} (sha256 {str(want.get('sha256'))[:12]}...) has no compiled prefix "
                       f"for base {self.index.fp} in {self.index.dtype} in the store at {self.index.root}")
                logger.error("softprompt: request %s fails: %s", request.request_id, why)
                return _Unservable(str(want.get("task")), P, why)
        if task is None or task.kv_sha256 in self._checked:
            return task
        try:
            read_prefix(task)  # checksum checked before any request of this version is admitted
        except PrefixDamaged as e:
            logger.error("softprompt: request %s fails: %s", request.request_id, e)
            return _Unservable(task.ref, task.num_virtual_tokens, str(e))
        self._checked.add(task.kv_sha256)
        return task

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        task = self._task_of(request)
        if task is None:
            self._matched.pop(request.request_id, None)
            return 0, False
        self._matched[request.request_id] = task
        todo = task.num_virtual_tokens - num_computed_tokens
        if todo <= 0:
            self.stats["cached_requests"] += 1  # the whole prefix came from vLLM's own prefix cache
            return 0, False
        return todo, False  # loaded synchronously, before this step's forward pass

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        task = self._matched.pop(request.request_id, None)
        if num_external_tokens > 0 and task is not None:
            self._pending[request.request_id] = (task, task.num_virtual_tokens - num_external_tokens)

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = SoftpromptMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            got = self._pending.pop(new.req_id, None)
            if got is not None:
                task, start = got
                meta.loads.append(_Load(new.req_id, task, start,
                                        self._slots(new.block_ids[0], start, task.num_virtual_tokens)))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            # a preempted request resumed: its blocks were freed, all of them are new
            got = self._pending.pop(req_id, None)
            if got is not None and req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                task, start = got
                meta.loads.append(_Load(req_id, task, start,
                                        self._slots(cached.new_block_ids[i][0], start, task.num_virtual_tokens)))
        for load in meta.loads:
            failed = isinstance(load.task, _Unservable)
            self.stats["failed_requests" if failed else "loaded_requests"] += 1
            self.stats["loaded_tokens"] += 0 if failed else len(load.slots)
        return meta

    def request_finished(self, request, block_ids):
        self._pending.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        return False, None  # nothing saved: blocks are freed (or kept by the prefix cache) as usual

    # ---- worker side ------------------------------------------------------------------------
    def _prefix(self, task: VllmTask) -> torch.Tensor:
        kv = self._prefixes.pop(task.kv_sha256, None)
        if kv is None:
            kv = read_prefix(task)  # checked again here: the worker may be another process
        self._prefixes[task.kv_sha256] = kv  # most recently used last
        while sum(t.numel() * t.element_size() for t in self._prefixes.values()) > CACHE_BYTES and len(self._prefixes) > 1:
            self._prefixes.pop(next(iter(self._prefixes)))
        return kv

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, SoftpromptMetadata) or not meta.loads:
            return
        layers = [(name, layer) for name, layer in forward_context.no_compile_layers.items()
                  if getattr(layer, "kv_cache", None) is not None and hasattr(getattr(layer, "impl", None),
                                                                              "do_kv_cache_update")]
        for load in meta.loads:
            kv = None
            if not isinstance(load.task, _Unservable):
                try:
                    kv = self._prefix(load.task)  # (L, 2, H_kv, P, D)
                except PrefixDamaged as e:  # changed since the scheduler's check: this request fails, not vLLM
                    logger.error("softprompt: request %s fails: %s", load.req_id, e)
            if kv is not None and len(layers) != kv.shape[0]:
                logger.error("softprompt: request %s fails: %s has %d layers, the model %d", load.req_id,
                             load.task.ref, kv.shape[0], len(layers))
                kv = None
            if kv is None:
                self._invalid.update(slot // self.block_size for slot in load.slots)
                continue
            for name, layer in layers:
                m = LAYER_INDEX.search(name)
                l = int(m.group(1))
                cache = layer.kv_cache
                part = kv[l, :, :, load.start:].to(device=cache.device, dtype=layer.kv_cache_torch_dtype
                                                  if cache.dtype.is_floating_point else kv.dtype)
                key = part[0].transpose(0, 1).contiguous()  # (n, H_kv, D)
                value = part[1].transpose(0, 1).contiguous()
                slots = torch.tensor(load.slots, dtype=torch.long, device=cache.device)
                layer.impl.do_kv_cache_update(layer, key, value, cache, slots)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """The blocks of this step's failed loads: vLLM fails their requests and evicts the blocks."""
        out, self._invalid = self._invalid, set()
        return out

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous, done in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # a consumer only: vLLM's own prefix cache keeps what was loaded

    def wait_for_save(self):
        return
