"""The one object serving knows: a KV prefix, and how a batch of them enters a frozen decoder.

A KV prefix is a tensor `(L, 2, H_kv, P, D)`: per layer, the keys (index 0) and values (index 1)
of `P` virtual positions. Keys are stored as the attention sees them (after RoPE, for models that
rotate), exactly as in a KV cache, so a prefix is "already computed past" and costs nothing per
request.

Layout of one forward pass over a batch whose row `i` has a prefix of length `P_i` and a
left-padded prompt:

    key/value slots:  [ 0 .. Pmax-P_i pad | P_i prefix | pad | T_i tokens ]
    attention mask:   [ 0 ...           0 | 1 ...    1 | 0.. | 1 ...    1 ]
    positions:                                                 P_i, P_i+1, ...

Prefixes are left-padded to `Pmax` so they end at the same slot; the mask hides the pad slots;
positions come from the mask, so padding never shifts a row (PEFT's convention: real tokens after
a prefix of length P take positions P, P+1, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A cache layer with spare capacity: appending writes in place (amortized O(1) per token)
    where DynamicLayer's `torch.cat` copies the whole cache at every decoding step, which for a
    batch of 32 rows of ~100 slots is ~150 MB of copying per step on the 30-layer default model."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
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


def stack_prefixes(
    prefixes: Sequence[torch.Tensor | None], batch_size: int | None = None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Left-pad per-row prefixes to a common length.

    prefixes: one `(L, 2, H, P_i, D)` tensor or None (no prefix) per row; or a single-element
    sequence broadcast to `batch_size` rows (without copying).
    Returns `kv` `(L, 2, B, H, Pmax, D)` (None if every row is bare) and `mask` `(B, Pmax)`.
    """
    if batch_size is not None and len(prefixes) == 1 and batch_size != 1:
        p = prefixes[0]
        if p is None:
            return None, torch.zeros(batch_size, 0, dtype=torch.long)
        L, two, H, P, D = p.shape
        kv = p.unsqueeze(2).expand(L, two, batch_size, H, P, D)  # (L, 2, B, H, P, D), a view
        return kv, torch.ones(batch_size, P, dtype=torch.long, device=p.device)
    real = [p for p in prefixes if p is not None]
    B = len(prefixes)
    if not real:
        return None, torch.zeros(B, 0, dtype=torch.long)
    ref = real[0]
    L, two, H, _, D = ref.shape
    pmax = max(p.shape[3] for p in real)
    if all(p is not None and p.shape[3] == pmax for p in prefixes):
        return torch.stack(list(prefixes), dim=2), torch.ones(B, pmax, dtype=torch.long, device=ref.device)
    kv = ref.new_zeros(L, two, B, H, pmax, D)
    mask = torch.zeros(B, pmax, dtype=torch.long, device=ref.device)
    for i, p in enumerate(prefixes):
        if p is not None and p.shape[3]:
            kv[:, :, i, :, pmax - p.shape[3]:] = p
            mask[i, pmax - p.shape[3]:] = 1
    return kv, mask


def make_cache(kv: torch.Tensor | None, cache_cls: type[DynamicCache] = DynamicCache) -> DynamicCache:
    """A DynamicCache already holding the prefix: kv `(L, 2, B, H, P, D)` or None for an empty one.

    `update` concatenates new keys onto the prefix (never writes into it), so a shared prefix
    tensor is safe to pass, and gradients flow back into it during training.
    """
    cache = cache_cls()
    if kv is not None:
        for layer in range(kv.shape[0]):
            cache.update(kv[layer, 0], kv[layer, 1], layer)
    return cache


def positions_after_prefix(attention_mask: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
    """Positions of real tokens: `P_i + (number of real tokens before them)`.

    attention_mask: (B, T) over the prompt only; prefix_lengths: (B,). Pad slots get position
    `P_i` (any value would do: nothing attends to them).
    """
    pos = attention_mask.long().cumsum(-1) - 1  # (B, T)
    pos = pos.clamp(min=0) + prefix_lengths.view(-1, 1).to(pos.device)
    return pos


def prefixed_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefixes: Sequence[torch.Tensor | None],
    *,
    use_cache: bool = True,
    cache_cls: type[DynamicCache] = DynamicCache,
    **kwargs,
):
    """One forward pass of a frozen causal LM over a left-padded batch where row `i` carries
    `prefixes[i]` (or `prefixes = [p]` for one prefix shared by all rows).

    input_ids, attention_mask: (B, T). Returns the HF output; `.past_key_values` holds prefix +
    prompt and `.prefix_mask` (B, Pmax) is attached so a decoding loop can extend the mask.
    """
    B = input_ids.shape[0]
    kv, pmask = stack_prefixes(prefixes, batch_size=B)
    pmask = pmask.to(attention_mask.device)
    full_mask = torch.cat([pmask, attention_mask.long()], dim=1)  # (B, Pmax + T)
    position_ids = positions_after_prefix(attention_mask, pmask.sum(-1))
    out = model(
        input_ids=input_ids,
        attention_mask=full_mask,
        position_ids=position_ids,
        past_key_values=make_cache(kv, cache_cls) if (kv is not None or use_cache) else None,
        use_cache=use_cache,
        **kwargs,
    )
    out.prefix_mask = pmask
    out.attention_mask = full_mask
    out.position_ids = position_ids
    return out


@torch.no_grad()
def compile_embeddings(model, embeddings: torch.Tensor) -> torch.Tensor:
    """Compile a soft prompt into a KV prefix: one pass of the frozen model over it.

    embeddings: (P, d) input embeddings at positions 0..P-1. In a causal decoder nothing a
    prompt token computes depends on what follows it, so these keys/values are exactly what the
    soft prompt contributes to every later token. Returns `(L, 2, H_kv, P, D)`.
    """
    P = embeddings.shape[0]
    dev = next(model.parameters()).device
    emb = embeddings.to(device=dev, dtype=next(model.parameters()).dtype).unsqueeze(0)  # (1, P, d)
    out = model(
        inputs_embeds=emb,
        attention_mask=torch.ones(1, P, dtype=torch.long, device=dev),
        position_ids=torch.arange(P, device=dev).unsqueeze(0),
        past_key_values=DynamicCache(),
        use_cache=True,
        logits_to_keep=1,
    )
    return cache_to_prefix(out.past_key_values, row=0)


def cache_to_prefix(cache, row: int = 0) -> torch.Tensor:
    """Read one row of a filled DynamicCache back as a `(L, 2, H, P, D)` prefix."""
    layers = []
    for layer in cache.layers:
        layers.append(torch.stack([layer.keys[row], layer.values[row]]))  # (2, H, P, D)
    return torch.stack(layers).contiguous()
