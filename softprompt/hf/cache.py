"""Caches and the forward call: the only code that builds, reads, grows, slices or merges a
transformers cache, or names the keyword a model takes it by.

The rest of softprompt holds a running batch's cache as an opaque handle and speaks in its own
terms: a KV prefix `(L, 2, H_kv, P, D)` per row, stacked `(L, 2, B, H_kv, P, D)` for a batch.

transformers renamed the cache keyword (`past_key_values` -> `cache`, 5.24, the old name removed
in 5.40) and the output field with it; which one a model takes is read from its `forward`'s
signature (feature detection, never version strings), once per model class.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import Cache, DynamicLayer

from softprompt.hf.errors import UnsupportedModel

KEYWORDS = ("cache", "past_key_values")  # newest first
_keyword: dict[type, str] = {}


def keyword(module) -> str:
    """The name under which `module.forward` takes a cache: 'cache' (transformers >= 5.24) or
    'past_key_values'. Raises UnsupportedModel when it takes neither (a prefix could not enter)."""
    cls = type(module)
    if cls not in _keyword:
        params = inspect.signature(cls.forward).parameters  # follows @wraps to the real signature
        found = next((k for k in KEYWORDS if k in params), None)
        if found is None:  # a wrapper that passes **kwargs on: PEFT's LoRA model, a task head over BERT
            getter = getattr(module, "get_base_model", None)
            inner = getter() if callable(getter) else getattr(module, "base_model", None)
            if isinstance(inner, torch.nn.Module) and inner is not module:
                found = keyword(inner)
        if found is None:
            import transformers

            raise UnsupportedModel(
                f"{cls.__name__}.forward takes no cache (neither {' nor '.join(KEYWORDS)}) under transformers "
                f"{transformers.__version__}: a KV prefix cannot enter it; use a model family from the support "
                f"table in docs, or the transformers version in requirements.lock")
        _keyword[cls] = found
    return _keyword[cls]


def call(model, cache=None, **kwargs):
    """`model(**kwargs)` with `cache` passed under the keyword the model takes (omitted when None)."""
    if cache is not None:
        kwargs[keyword(model)] = cache
    return model(**kwargs)


def cache_of(output):
    """The cache a forward pass returned (`.cache` on new releases, `.past_key_values` before)."""
    for name in KEYWORDS:
        found = getattr(output, name, None)
        if found is not None:
            return found
    return None


@dataclass
class Output:
    """What our forward passes return: logits, the cache as an opaque handle, and (on request)
    attentions. Prefixed passes add the full mask, the positions and the prefix mask they used."""

    logits: torch.Tensor | None
    cache: Any = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None  # with output_hidden_states=True: per layer input, (B, T, d)
    last_hidden_state: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # (B, Pmax + T)
    position_ids: torch.Tensor | None = None  # (B, T)
    prefix_mask: torch.Tensor | None = None  # (B, Pmax)


def forward(model, cache=None, **kwargs) -> Output:
    """One forward pass; returns an `Output` (its cache: the one returned, else the one given,
    which the model filled in place)."""
    if kwargs.get("logits_to_keep"):
        from softprompt.hf.hooks import contiguous_head

        contiguous_head(model)
    out = call(model, cache, **kwargs)
    returned = cache_of(out)
    return Output(logits=getattr(out, "logits", None), cache=cache if returned is None else returned,
                  attentions=getattr(out, "attentions", None), hidden_states=getattr(out, "hidden_states", None),
                  last_hidden_state=getattr(out, "last_hidden_state", None))


# --------------------------------------------------------------------------------------------
# Decoder caches


class GrowingLayer(DynamicLayer):
    """A cache layer with spare capacity: appending writes in place (amortized O(1) per token)
    where DynamicLayer's `torch.cat` copies the whole cache at every decoding step, which for a
    batch of 32 rows of ~100 slots is ~150 MB of copying per step on the 30-layer default model."""

    def lazy_initialization(self, key_states, value_states, *args, **kwargs):
        super().lazy_initialization(key_states, value_states, *args, **kwargs)
        self._k = self._v = None
        self._n = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        if self._k is None or self._n + n_new > self._k.shape[-2] or self._k.shape[0] != key_states.shape[0]:
            cap = max(64, 2 * (self._n + n_new))
            B, H, _, D = key_states.shape
            k = key_states.new_empty(B, H, cap, D)
            v = value_states.new_empty(B, H, cap, value_states.shape[-1])
            if self._n:
                k[:, :, : self._n] = self._k[:, :, : self._n]
                v[:, :, : self._n] = self._v[:, :, : self._n]
            self._k, self._v = k, v
        self._k[:, :, self._n: self._n + n_new] = key_states
        self._v[:, :, self._n: self._n + n_new] = value_states
        self._n += n_new
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A DynamicCache whose layers grow in place (see GrowingLayer); for inference only."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


def placement(model) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the keys and values a model's cache holds: those of its input
    embeddings (bfloat16 for a base loaded in bfloat16; float32 for an int8-quantized base, whose
    Linear layers return float32)."""
    w = model.get_input_embeddings().weight
    return w.dtype, w.device


def new_cache(kv: torch.Tensor | None = None, *, growing: bool = False, model=None) -> DynamicCache:
    """A cache already holding `kv` `(L, 2, B, H, P, D)` (or empty). `growing`: appends write in
    place (inference); otherwise appends concatenate and never write into `kv`, so a shared prefix
    tensor is safe to pass and gradients flow back into it during training. With `model`, `kv` is
    cast to the model's cache dtype and device first (prefixes stay float32 in artifacts and while
    training; the cast is differentiable and a no-op when they already match)."""
    cache = GrowingCache() if growing else DynamicCache()
    if kv is not None and model is not None:
        dtype, device = placement(model)
        kv = kv.to(device=device, dtype=dtype)
    if kv is not None:
        for layer in range(kv.shape[0]):
            cache.update(kv[layer, 0], kv[layer, 1], layer)
    return cache


def from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]], *, growing: bool = True) -> DynamicCache:
    """A cache from per-layer `(keys, values)` of shape (B, H, S, D)."""
    cache = GrowingCache() if growing else DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer `(keys, values)`, each (B, H, S, D)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def length(cache) -> int:
    """Slots the cache holds (prefix + tokens seen)."""
    return 0 if cache is None else int(cache.get_seq_length())


def to_prefix(cache, row: int = 0) -> torch.Tensor:
    """One row of a filled cache as a KV prefix `(L, 2, H, S, D)`."""
    return torch.stack([torch.stack([k[row], v[row]]) for k, v in layers(cache)]).contiguous()


def select(cache, rows: torch.Tensor, first: int = 0) -> DynamicCache:
    """The cache cut to `rows` (B',) and to slots `first:` (a new cache; the old one is not changed)."""
    return from_layers([(k.index_select(0, rows)[:, :, first:], v.index_select(0, rows)[:, :, first:])
                        for k, v in layers(cache)])


def _lpad(t: torch.Tensor, S: int) -> torch.Tensor:
    """Left-pad a (B, H, s, D) cache tensor with zeros to S slots."""
    s = t.shape[2]
    if s == S:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], S - s, t.shape[3]), t], dim=2)


def concat(a, b) -> DynamicCache:
    """Rows of `a` then rows of `b`, the shorter left-padded with zero slots (the caller's mask
    hides them) so both end at the same slot."""
    S = max(length(a), length(b))
    return from_layers([(torch.cat([_lpad(ka, S), _lpad(kb, S)]), torch.cat([_lpad(va, S), _lpad(vb, S)]))
                        for (ka, va), (kb, vb) in zip(layers(a), layers(b))])


def repeat_rows(cache, n: int) -> None:
    """Each row repeated n times, in place (beam search starts from one prefilled row)."""
    cache.batch_repeat_interleave(n)


def reorder_rows(cache, rows: torch.Tensor) -> None:
    """Rows gathered by index (B',), in place (beam search keeps the surviving beams)."""
    cache.reorder_cache(rows)


# --------------------------------------------------------------------------------------------
# Encoder-decoder caches: a self-attention half (decoder prefix + tokens) and a cross half


def encdec_cache(self_layers: list[tuple[torch.Tensor, torch.Tensor]],
                 cross_layers: list[tuple[torch.Tensor, torch.Tensor]], *, growing: bool = False) -> EncoderDecoderCache:
    """An encoder-decoder cache from per-layer (keys, values) of both halves. The cross half
    holds the full cross-attention keys/values (prefix + encoder states), marked as computed, so
    the model reuses them (also in a gradient-checkpointing recompute)."""
    self_cache, cross = (GrowingCache() if growing else DynamicCache()), DynamicCache()
    for i, ((sk, sv), (ck, cv)) in enumerate(zip(self_layers, cross_layers)):
        self_cache.update(sk, sv, i)
        cross.update(ck, cv, i)
    return EncoderDecoderCache(self_cache, cross)  # marks each filled cross layer as computed


def encdec_select(cache: EncoderDecoderCache, rows: torch.Tensor) -> EncoderDecoderCache:
    """Both halves cut to `rows` (B',)."""
    pick = [[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in layers(half)]
            for half in (cache.self_attention_cache, cache.cross_attention_cache)]
    return encdec_cache(pick[0], pick[1], growing=True)
