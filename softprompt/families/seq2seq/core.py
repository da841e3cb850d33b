"""Encoder-decoder models (T5, BART families): where a prompt enters, and one forward pass with it.

A seq2seq prompt compiles to a `Seq2SeqPrefix` with up to four parts, any of which may be absent:

    embeds   (P, d)               soft prompt placed before the encoder's input (prompt tuning)
    encoder  (L_enc, 2, H, P, D)  K/V prefix of the encoder's self-attention    (prefix tuning,
    decoder  (L_dec, 2, H, P, D)  K/V prefix of the decoder's self-attention     Li & Liang's BART
    cross    (L_dec, 2, H, P, D)  K/V prefix of the decoder's cross-attention    recipe)

Unlike a causal decoder, a soft prompt in the encoder cannot compile to a KV prefix: the encoder
is bidirectional, so the prompt's hidden states depend on the text after it. It stays embeddings.

How each part gets in, per row `i` of a batch (prefixes left-padded to a common length, as in
softprompt/hf/prefix.py; the mask hides the pad slots):
  embeds   rebuilt encoder input  [P_i soft | T_i tokens | pad], right-padded, so absolute
           positions (BART) of real tokens never move and relative ones (T5) never change
  encoder  HF encoders take no cache, so a forward pre-hook on each encoder layer (installed
           for the call only, per module instance) adds to the layer's arguments a tiny cache
           holding the prefix and a mask over [prefix | tokens]; being arguments, gradient
           checkpointing's recompute sees them too
  decoder  the self-attention half of an `EncoderDecoderCache` (as PEFT does); decoder tokens
           take positions P_i, P_i+1, ... (BART's learned positions are shifted per row by a
           hook on `embed_positions` when rows have different P_i; T5's are relative)
  cross    the cross-attention half of the same cache, filled by us with [prefix | the encoder
           states' keys/values] (marked computed, so the model reuses them); the model is
           given a stand-in for the encoder states of the same length Pc + S and the mask over
           [prefix | encoder tokens], from which it builds its cross-attention mask
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from softprompt import hf
from softprompt.hf.prefix import stack_prefixes
from softprompt.methods.base import Prefix

PARTS = ("encoder", "decoder", "cross")


def is_seq2seq(model_or_config) -> bool:
    """True for encoder-decoder models (T5, BART), from a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


class Seq2SeqError(ValueError):
    """A seq2seq model or prompt cannot be used as asked; the message says why."""


@dataclass(frozen=True)
class Seq2SeqGeometry:
    """Attention shapes of both stacks (T5: d_kv may differ from d_model / heads)."""

    model_type: str
    encoder_layers: int
    decoder_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    def part_shape(self, part: str, num_virtual_tokens: int) -> tuple[int, int, int, int, int]:
        layers = self.encoder_layers if part == "encoder" else self.decoder_layers
        return (layers, 2, self.num_heads, num_virtual_tokens, self.head_dim)

    @property
    def kv_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_layers(self) -> int:  # the names shared code prints in messages
        return self.decoder_layers

    @property
    def num_key_value_heads(self) -> int:
        return self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


def seq2seq_geometry(model_or_config) -> Seq2SeqGeometry:
    c = getattr(model_or_config, "config", model_or_config)
    if not is_seq2seq(c):
        raise Seq2SeqError(f"{type(c).__name__} is not an encoder-decoder model (config.is_encoder_decoder is false)")
    heads = getattr(c, "num_heads", None) or c.encoder_attention_heads
    dec_heads = getattr(c, "num_heads", None) or c.decoder_attention_heads
    if heads != dec_heads:  # one prefix head count for all three sites keeps the layout simple
        raise Seq2SeqError(f"encoder and decoder have different head counts ({heads}, {dec_heads}); not supported")
    return Seq2SeqGeometry(
        model_type=getattr(c, "model_type", "unknown"),
        encoder_layers=int(getattr(c, "num_layers", None) or c.encoder_layers),
        decoder_layers=int(getattr(c, "num_decoder_layers", None) or c.decoder_layers),
        num_heads=int(heads),
        head_dim=int(getattr(c, "d_kv", None) or c.d_model // heads),
        hidden_size=int(c.d_model),
        vocab_size=int(c.vocab_size),
    )


@dataclass
class Seq2SeqPrefix(Prefix):
    """What a seq2seq prompt stands for at inference (see the module docstring for shapes): the
    family's `Prefix`, whose `kv()` is itself (the engine reads each part)."""

    embeds: torch.Tensor | None = None
    encoder: torch.Tensor | None = None
    decoder: torch.Tensor | None = None
    cross: torch.Tensor | None = None

    def kv(self) -> "Seq2SeqPrefix":
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device=None, dtype=None) -> "Seq2SeqPrefix":
        with torch.no_grad():
            return Seq2SeqPrefix(**{k: t.detach().to(device=device, dtype=dtype) for k, t in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: t for k in ("embeds", *PARTS) if (t := getattr(self, k)) is not None}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> "Seq2SeqPrefix":
        return Seq2SeqPrefix(**tensors)


def cross_kv(model, hidden: torch.Tensor, bp: "Seq2SeqBatchPrefix") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the cross-attention keys and values [prefix | encoder states]: (B, H, Pc + S, D)."""
    kv, _ = bp.cross
    out = hf.cross_attention_kv(model, hidden)
    if kv is None:
        return out
    return [(torch.cat([kv[i, 0].to(k.dtype), k], dim=2), torch.cat([kv[i, 1].to(v.dtype), v], dim=2))
            for i, (k, v) in enumerate(out)]


# --------------------------------------------------------------------------------------------
# The batch: every row's parts stacked


@dataclass
class Seq2SeqBatchPrefix:
    """Per-part stacks `(L, 2, B, H, Pmax, D)` (or None) with masks `(B, Pmax)`, plus soft prompts."""

    embeds: list  # B entries: (P_i, d) or None
    encoder: tuple
    decoder: tuple
    cross: tuple

    @classmethod
    def build(cls, prefixes: Sequence[Seq2SeqPrefix | None], batch_size: int) -> "Seq2SeqBatchPrefix":
        if len(prefixes) == 1 and batch_size != 1:
            prefixes = list(prefixes) * batch_size  # stack_prefixes' own broadcast path would copy too
        if len(prefixes) != batch_size:
            raise Seq2SeqError(f"{len(prefixes)} prefixes for {batch_size} rows")
        parts = {}
        for part in PARTS:
            parts[part] = stack_prefixes([getattr(p, part) if p is not None else None for p in prefixes])
        return cls([p.embeds if p is not None else None for p in prefixes], **parts)


def encoder_inputs(model, input_ids, attention_mask, embeds: list):
    """Right-padded encoder input embeddings `(B, S, d)` and mask `(B, S)`, each row
    [soft prompt | its real tokens | pad]; input may come padded on either side."""
    table = model.get_input_embeddings()
    tok = table(input_ids)  # (B, T, d)
    B = input_ids.shape[0]
    lengths = [int(attention_mask[i].sum()) + (0 if embeds[i] is None else embeds[i].shape[0]) for i in range(B)]
    if not all(e is None for e in embeds) or bool((attention_mask[:, :1] == 0).any()):
        S = max(lengths)
        out = tok.new_zeros(B, S, tok.shape[-1])
        mask = attention_mask.new_zeros(B, S)
        for i in range(B):
            real = tok[i][attention_mask[i].bool()]  # (T_i, d)
            row = real if embeds[i] is None else torch.cat([embeds[i].to(tok.dtype), real], dim=0)
            out[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = 1
        return out, mask
    return tok, attention_mask


def encode(model, input_ids, attention_mask, bp: Seq2SeqBatchPrefix):
    """Encoder states `(B, S, d)` and their mask `(B, S)` with the soft prompt and encoder prefix."""
    emb, mask = encoder_inputs(model, input_ids, attention_mask, bp.embeds)
    kv, pmask = bp.encoder
    keep = torch.cat([pmask.to(mask.device), mask.long()], dim=1)  # (B, P + S)
    with hf.encoder_prefix(model, kv, keep):
        hidden = model.get_encoder()(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    return hidden, mask


def make_cache(model, bp: Seq2SeqBatchPrefix, hidden: torch.Tensor, growing: bool = False):
    """An encoder-decoder cache (opaque) holding the decoder self-attention prefix and the full
    cross-attention keys/values [prefix | encoder states], which the model reuses (also in a recompute)."""
    kv, _ = bp.decoder
    cross = cross_kv(model, hidden, bp)
    # Without a decoder prefix, still create each layer (empty): gradient checkpointing can only
    # restore a layer that existed before the call.
    own = [(kv[i, 0], kv[i, 1]) if kv is not None else (k[:, :, :0], v[:, :, :0]) for i, (k, v) in enumerate(cross)]
    return hf.encdec_cache(own, cross, growing=growing)


def decode(model, bp: Seq2SeqBatchPrefix, enc_hidden, enc_mask, decoder_input_ids, decoder_attention_mask=None,
           cache=None, growing: bool = False, **kwargs) -> hf.Output:
    """Decoder pass over `decoder_input_ids` (B, T), right-padded, after whatever `cache` holds
    (a fresh one with the prefixes when None). Returns an `hf.Output` (logits (B, T, V), cache)."""
    B, T = decoder_input_ids.shape
    dev = decoder_input_ids.device
    dkv, dmask = bp.decoder
    cmask = bp.cross[1].to(dev)
    if cache is None:
        cache = make_cache(model, bp, enc_hidden, growing)
    past = hf.length(cache)
    if decoder_attention_mask is None:
        decoder_attention_mask = torch.ones(B, T, dtype=torch.long, device=dev)
    if decoder_attention_mask.shape[1] == T:  # prepend the prefix slots and any earlier steps
        done = past - dmask.shape[1]
        decoder_attention_mask = torch.cat([dmask.to(dev), torch.ones(B, done, dtype=torch.long, device=dev),
                                            decoder_attention_mask.long()], dim=1)
    # The model only reads the shape of the encoder states (their keys/values are in the cache).
    stand_in = torch.cat([enc_hidden.new_zeros(B, cmask.shape[1], enc_hidden.shape[-1]), enc_hidden], dim=1)
    keep = torch.cat([cmask, enc_mask.long()], dim=1)  # (B, Pc + S)
    shift = (dmask.shape[1] - dmask.sum(-1)).to(dev) if dkv is not None else None
    with hf.decoder_position_shift(model, shift):
        return hf.forward(model, cache, encoder_outputs=(stand_in,), attention_mask=keep,
                          decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask, **kwargs)


def seq2seq_forward(model, prefixes, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                    **kwargs):
    """Encoder over `input_ids`/`attention_mask` (B, S) and decoder over `decoder_input_ids` (B, T),
    where row i carries `prefixes[i]` (or one prefix for all rows). Logits (B, T, V)."""
    bp = Seq2SeqBatchPrefix.build(list(prefixes), input_ids.shape[0])
    hidden, mask = encode(model, input_ids, attention_mask, bp)
    kwargs.setdefault("use_cache", False)
    return decode(model, bp, hidden, mask, decoder_input_ids, decoder_attention_mask, **kwargs)
