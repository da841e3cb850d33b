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

from softprompt import hf


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
    growing: bool = False,
    **kwargs,
) -> hf.Output:
    """One forward pass of a frozen causal LM over a left-padded batch where row `i` carries
    `prefixes[i]` (or `prefixes = [p]` for one prefix shared by all rows).

    input_ids, attention_mask: (B, T). Returns an `hf.Output`: logits, `.cache` (prefix + prompt,
    an opaque handle; `growing` for one that decoding appends to in place), `.attention_mask`
    (B, Pmax + T) and `.position_ids` (B, T) for a decoding loop to extend, `.prefix_mask` (B, Pmax).
    The first call on a model runs the self-check (`check_prefix_support`).
    """
    hf.once(model, check_prefix_support)
    B = input_ids.shape[0]
    kv, pmask = stack_prefixes(prefixes, batch_size=B)
    pmask = pmask.to(attention_mask.device)
    full_mask = torch.cat([pmask, attention_mask.long()], dim=1)  # (B, Pmax + T)
    position_ids = positions_after_prefix(attention_mask, pmask.sum(-1))
    cache = hf.new_cache(kv, growing=growing, model=model) if (kv is not None or use_cache) else None
    out = hf.forward(model, cache, input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                     use_cache=use_cache, **kwargs)
    out.prefix_mask, out.attention_mask, out.position_ids = pmask, full_mask, position_ids
    return out


@torch.no_grad()
def token_embeddings(model, ids) -> torch.Tensor:
    """The input embeddings `(n, d)` the model itself gives token ids, from its input embedding
    module rather than its weight table: the module applies any scale it has (Gemma 3 multiplies by
    sqrt(d) there), so these are the vectors of the tokens written out. float32 on the CPU."""
    emb = model.get_input_embeddings()
    return emb(torch.as_tensor(list(ids), device=emb.weight.device)).float().cpu()


@torch.no_grad()
def compile_ids(model, ids) -> torch.Tensor:
    """The KV prefix `(L, 2, H_kv, P, D)` of token ids at positions 0..P-1, in the model's cache dtype
    and on its device: exactly what the model computes for those tokens written out."""
    emb = model.get_input_embeddings()
    return compile_embeddings(model, emb(torch.as_tensor([list(ids)], device=emb.weight.device))[0])


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
    out = hf.forward(model, hf.new_cache(), inputs_embeds=emb, attention_mask=torch.ones(1, P, dtype=torch.long, device=dev),
                     position_ids=torch.arange(P, device=dev).unsqueeze(0), use_cache=True, logits_to_keep=1)
    return hf.to_prefix(out.cache, row=0)


@torch.no_grad()
def check_prefix_support(model) -> None:
    """Raise `hf.PrefixIgnored` unless `model` honours a KV prefix exactly (see softprompt/hf/check.py):
    a prefix compiled from 4 random tokens must give the logits of those tokens written out.

    On an int8 base (softprompt/hf/quantize.py) the exact check runs in its float reference mode (the
    same modules, attention and cache, each product by its dequantized weights), at float32's
    tolerance: a dropped, misplaced or mis-masked prefix fails there as on any base. The int8
    arithmetic is then held to its own noise: with the prefix, the int8 logits may stray from the
    reference's no further than three times what int8 rounding makes of the same tokens written out
    (a dropped prefix strays by the prefix's whole effect, ~10x that on the embedded model)."""
    from softprompt.hf.check import versions
    from softprompt.hf.quantize import float_reference, is_quantized

    try:
        if not is_quantized(model):
            _check(model)
            return
        with float_reference():
            ref = _check(model)
        _check(model, reference=ref)
    except hf.UnsupportedModel:
        raise
    except Exception as e:  # a shape error from a cache the model handles differently, say
        raise hf.PrefixIgnored(f"{type(model).__name__} fails the prefix self-check under {versions()}: "
                               f"{type(e).__name__}: {e}") from e


def _check(model, reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The check's three passes; returns (ours, want). With `reference` (the float reference mode's
    (ours, want) on an int8 base), this int8 pass is compared with it instead (see above)."""
    from softprompt.hf.check import compare, compare_noisy, versions

    dev = next(model.parameters()).device
    V = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, V, (1, 4), generator=g).to(dev)  # skip the low ids, often special tokens
    y = torch.randint(3, V, (1, 3), generator=g).to(dev)
    ones = torch.ones(1, 7, dtype=torch.long, device=dev)
    cache = hf.forward(model, hf.new_cache(), input_ids=x, attention_mask=ones[:, :4],
                       position_ids=torch.arange(4, device=dev)[None], use_cache=True).cache
    if cache is None or hf.length(cache) != 4:
        raise hf.PrefixIgnored(f"{type(model).__name__} did not fill the cache it was given "
                               f"(under {versions()}); a KV prefix cannot be read back")
    kv = hf.to_prefix(cache)  # (L, 2, H, 4, D)
    ours = prefixed_forward(model, y, ones[:, :3], [kv], use_cache=False).logits
    want = model(input_ids=torch.cat([x, y], 1), attention_mask=ones, use_cache=False).logits[:, 4:]
    bare = model(input_ids=y, attention_mask=ones[:, :3], use_cache=False).logits
    if reference is None:
        compare(ours, want, bare, "4 tokens compiled into a prefix", model)
    else:
        compare_noisy(ours, want, bare, reference[1], "4 tokens compiled into a prefix", model)
    return ours, want
