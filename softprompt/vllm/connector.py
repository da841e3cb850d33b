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
    store             the store's root directory (a local SQLite store)
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


@dataclass
class _Load:
    req_id: str
    task: VllmTask
    start: int  # first prefix position to write (those before it are in vLLM's prefix cache already)
    slots: list[int]  # slot of each position start..P-1


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
        self._pending: dict[str, tuple[VllmTask, int]] = {}  # scheduler: req_id -> (task, start), loaded next step
        self._prefixes: dict[str, torch.Tensor] = {}  # worker: kv_sha256 -> kv (L, 2, H, P, D), LRU order
        self._checked: set[str] = set()  # scheduler: kv_sha256 of compiled files read and hashed once
        self.stats = {"loaded_requests": 0, "loaded_tokens": 0, "cached_requests": 0}

    # ---- scheduler side ---------------------------------------------------------------------
    def _task_of(self, request) -> VllmTask | None:
        task = self.index.match(request.prompt_token_ids or [])
        if task is None or task.kv_sha256 in self._checked:
            return task
        try:
            read_prefix(task)  # checksum checked before any request of this version is admitted
        except PrefixDamaged as e:
            # never served; the placeholders then run as ordinary tokens, so say so loudly
            logger.error("softprompt: %s; request %s runs WITHOUT its prefix", e, request.request_id)
            return None
        self._checked.add(task.kv_sha256)
        return task

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        task = self._task_of(request)
        if task is None:
            return 0, False
        todo = task.num_virtual_tokens - num_computed_tokens
        if todo <= 0:
            self.stats["cached_requests"] += 1  # the whole prefix came from vLLM's own prefix cache
            return 0, False
        return todo, False  # loaded synchronously, before this step's forward pass

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        if num_external_tokens > 0:
            task = self.index.match(request.prompt_token_ids or [])
            if task is not None:
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
            self.stats["loaded_requests"] += 1
            self.stats["loaded_tokens"] += len(load.slots)
        return meta

    def request_finished(self, request, block_ids):
        self._pending.pop(request.request_id, None)
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
            kv = self._prefix(load.task)  # (L, 2, H_kv, P, D)
            if len(layers) != kv.shape[0]:
                raise PrefixDamaged(f"{load.task.ref}: prefix has {kv.shape[0]} layers, the model {len(layers)}")
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

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous, done in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # a consumer only: vLLM's own prefix cache keeps what was loaded

    def wait_for_save(self):
        return
