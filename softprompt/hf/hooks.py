"""Hooks into a model's layers: the only code that patches a layer's forward or registers hooks.

- `gradient_checkpointing`: recompute decoder layers in backward with a KV prefix in the cache
  (transformers' own checkpointing drops the cache, which is why PEFT refuses prefix tuning with it);
- `lm_head_at`: the LM head sees only selected positions (the loss needs a few target columns);
- `contiguous_head`: the LM head's input made contiguous (a strided last position costs a bmm);
- `encoder_prefix`: a K/V prefix before every encoder self-attention (HF encoders take no cache);
- `decoder_position_shift`: learned absolute decoder positions counted per row (BART family);
- `cross_attention_kv`: the keys/values a decoder's cross-attention computes over encoder states;
- `eager_attention`: the attention implementation that returns weights, for inspection;
- `layer_outputs`: the hidden states after chosen decoder layers, captured during a forward pass
  (the off-task guard reads them from the engine's prefill), optionally stopping the pass there.
"""

from __future__ import annotations

import contextlib

import torch

from softprompt.hf.cache import keyword
from softprompt.hf.errors import UnsupportedModel


@contextlib.contextmanager
def _pre_hooks(pairs):
    handles = [mod.register_forward_pre_hook(fn, with_kwargs=True) for mod, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def lm_head_at(model, sel: torch.Tensor):
    """Within this block the LM head sees only the hidden states where `sel` (B, K) is True
    (of the last K positions), so logits come out as (N, V) for N selected positions."""
    with _pre_hooks([(model.get_output_embeddings(), lambda mod, args, kwargs: ((args[0][sel],), kwargs))]):
        yield


def _contiguous(module, args, kwargs):
    return (args[0].contiguous(), *args[1:]), kwargs


def contiguous_head(model) -> None:
    """Give the LM head a contiguous input from now on (once per model; copies are kept).

    Why: with `logits_to_keep=1` transformers hands the head `hidden[:, -1:, :]`, a (B, 1, d) view
    strided by the whole sequence. `F.linear` cannot fold such a view into one matrix product, so it
    runs a bmm against the weight expanded to (B, d, V): B matrix-vector products, each reading the
    whole head, and in bfloat16 a copy of the expanded weight first (32 x 576 x 49152 values, 1.8 GB,
    10 s of a 15 s engine run on the embedded model). Made contiguous, it is one (B, d) @ (d, V)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_softprompt_contiguous", False):
        return
    head.register_forward_pre_hook(_contiguous, with_kwargs=True)
    head._softprompt_contiguous = True


@contextlib.contextmanager
def gradient_checkpointing(model, enabled: bool = True):
    """Recompute each decoder layer in the backward pass instead of storing its activations.

    Works with a KV prefix: the cache a layer appends to is restored after each call, so the
    recompute sees the same prefix and gradients still reach it.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not found:
        raise UnsupportedModel(f"gradient checkpointing: found no decoder layers in {type(model).__name__}")

    def wrap(layer):
        inner = layer.forward

        def run(*args, **kwargs):
            seen = (getattr(a, "self_attention_cache", a) for a in (*args, *kwargs.values()))  # seq2seq: its self half
            cache = next((a for a in seen if hasattr(a, "layers") and hasattr(a, "update")), None)
            saved = [(c.keys, c.values, getattr(c, "is_initialized", True)) for c in getattr(cache, "layers", [])]
            try:
                return inner(*args, **kwargs)
            finally:
                for c, (k, v, init) in zip(getattr(cache, "layers", []), saved):
                    c.keys, c.values = k, v
                    if hasattr(c, "is_initialized"):
                        c.is_initialized = init

        return lambda *a, **kw: checkpoint(run, *a, use_reentrant=False, **kw)

    for layer in found:
        layer.forward = wrap(layer)
    try:
        yield
    finally:
        for layer in found:
            del layer.forward


@contextlib.contextmanager
def eager_attention(model):
    """Temporarily switch `model` to eager attention (the only one that returns attention weights)."""
    old = getattr(model.config, "_attn_implementation", None)
    if old == "eager" or not hasattr(model, "set_attn_implementation"):
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(old)


class _Stop(BaseException):
    """Raised by a capture hook to end a forward pass once the last wanted layer has run (a
    BaseException, so no `except Exception` on the way out mistakes it for a failure)."""


def decoder_layers(model) -> list:
    """A causal decoder's transformer layers, first to last (every family's are
    GradientCheckpointingLayer modules, found in definition order)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not found:
        raise UnsupportedModel(f"found no decoder layers in {type(model).__name__}")
    return found


@contextlib.contextmanager
def layer_outputs(model, layers, *, stop: bool = False):
    """Within this block each forward pass records, for each `l` in `layers`, the hidden states
    after `l` decoder layers into the yielded dict: {l: (B, T, d)}; 1 <= l <= L (HF's `hidden_states[l]`
    for l < L; at L, the last layer's output before the final norm).

    Nothing the model computes changes (the hook reads its layer's output and returns None). With
    `stop`, the pass ends right after the last wanted layer (the block then swallows that early end:
    code after the forward call inside the block does not run), for callers that want only these
    states and no logits; do not pass it a cache to keep, and run any first-call self-check before
    the block (it would be stopped too). Tensors are the model's own (not copies)."""
    wanted = sorted(set(int(l) for l in layers))
    if not wanted:  # nothing to read: no hook, no cost
        yield {}
        return
    found = decoder_layers(model)
    if wanted[0] < 1 or wanted[-1] > len(found):
        raise ValueError(f"layers must be in 1..{len(found)}, got {wanted}")
    got: dict[int, torch.Tensor] = {}

    def hook_for(l: int):
        def hook(module, args, out):
            got[l] = out[0] if isinstance(out, tuple) else out  # older layers return (hidden, ...)
            if stop and l == wanted[-1]:
                raise _Stop

        return hook

    handles = [found[l - 1].register_forward_hook(hook_for(l)) for l in wanted]
    try:
        yield got
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# Encoder-decoder (T5, BART) and encoder (BERT) internals


def stack_layers(stack) -> list:
    """The transformer layers of an encoder or decoder stack (T5: `.block`, BART/BERT: `.layers`/`.layer`)."""
    for name in ("block", "layers", "layer"):
        found = getattr(stack, name, None)
        if isinstance(found, torch.nn.ModuleList):
            return list(found)
    raise UnsupportedModel(f"cannot find the layers of {type(stack).__name__}")


def _find(layer, names: tuple[str, ...]):
    for name in names:
        mod = layer
        try:
            for part in name.split("."):
                mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
            return mod
        except (AttributeError, IndexError):
            continue
    raise UnsupportedModel(f"cannot find the attention module ({' or '.join(names)}) in {type(layer).__name__}")


def additive_mask(keep: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """keep (B, K) 0/1 -> additive mask (B, 1, q_len, K): 0 where kept, the dtype's min elsewhere
    (a float mask works for both the eager and the SDPA attention of T5 and BART)."""
    m = (1.0 - keep.to(dtype))[:, None, None, :] * torch.finfo(dtype).min
    return m.expand(-1, 1, q_len, -1)


class _PrefixKV:
    """The smallest cache an attention module accepts: `update` puts one layer's prefix before
    the new keys/values and keeps nothing, so a recompute gets the same answer."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (B, H, P, D)
        self.is_updated = {}

    def get_seq_length(self, layer_idx=0) -> int:
        return self.k.shape[-2]

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return (torch.cat([self.k.to(key_states.dtype), key_states], dim=-2),
                torch.cat([self.v.to(value_states.dtype), value_states], dim=-2))


def encoder_prefix(model, kv: torch.Tensor | None, keep: torch.Tensor):
    """Within this block each encoder self-attention sees a K/V prefix before the tokens.

    kv (L, 2, B, H, P, D) or None; keep (B, P + S): 0/1 over [prefix | tokens]. T5 blocks and BART
    encoder layers take (hidden_states, attention_mask, ...) and hand the cache to their
    self-attention; being arguments, gradient checkpointing's recompute sees them too.
    """
    if kv is None:
        return contextlib.nullcontext()
    found = stack_layers(model.get_encoder())

    def hook_for(i: int, layer):
        name = _layer_keyword(layer)

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = additive_mask(keep, hidden.shape[1], hidden.dtype)  # (B, 1, S, P + S)
            if len(args) > 1:
                args = (args[0], mask, *args[2:])
            else:
                kwargs["attention_mask"] = mask
            for other in ("cache", "past_key_values"):
                kwargs.pop(other, None)
            kwargs[name] = _PrefixKV(kv[i, 0], kv[i, 1])
            return args, kwargs

        return hook

    return _pre_hooks([(layer, hook_for(i, layer)) for i, layer in enumerate(found)])


def _layer_keyword(layer) -> str:
    """The cache keyword a layer takes itself, or (BART: a layer that passes **kwargs on) its self-attention's."""
    try:
        return keyword(layer)
    except UnsupportedModel:
        return keyword(_find(layer, ("self_attn", "attention.self", "layer.0.SelfAttention")))


def cross_attentions(model) -> list:
    return [_find(layer, ("layer.1.EncDecAttention", "encoder_attn")) for layer in stack_layers(model.get_decoder())]


def cross_attention_kv(model, hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the keys and values its cross-attention computes from encoder states
    `hidden` (B, S, d): each (B, H, S, D)."""
    out = []
    B, S, _ = hidden.shape
    for attn in cross_attentions(model):
        projs = (attn.k, attn.v) if hasattr(attn, "k") else (attn.k_proj, attn.v_proj)
        D = attn.key_value_proj_dim if hasattr(attn, "key_value_proj_dim") else attn.head_dim
        out.append(tuple(p(hidden).view(B, S, -1, D).transpose(1, 2) for p in projs))
    return out


def decoder_position_shift(model, shift: torch.Tensor | None):
    """Learned absolute decoder positions (BART family) counted from each row's own prefix length:
    the decoder numbers tokens from the cache length Pmax, so row i is moved back by shift[i]."""
    emb = getattr(model.get_decoder(), "embed_positions", None)
    if emb is None or shift is None or not bool((shift != 0).any()):
        return contextlib.nullcontext()

    def hook(module, args, kwargs, out):  # out (1 or B, T, d)
        ids = kwargs.get("position_ids")
        if ids is None:
            return out
        rows = [module.forward(*args, **dict(kwargs, position_ids=ids - s)).reshape(-1, out.shape[-2], out.shape[-1])
                for s in shift.tolist()]
        return torch.cat(rows, dim=0)  # (B, T, d)

    return _post_hook(emb, hook)


@contextlib.contextmanager
def _post_hook(module, fn):
    handle = module.register_forward_hook(fn, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
