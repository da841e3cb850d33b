"""PEFT SEQ_2_SEQ_LM prompt-learning adapters as our seq2seq prompts.

What PEFT 0.21 does with them (read from peft_model.py, confirmed by the oracle tests):
  PROMPT_TUNING  `prompt_embeddings` is (2P, d) (num_transformer_submodules = 2), but the forward
                 pass only puts the first P rows before the encoder's input; the other P are
                 never used. -> our `prompt_embeddings` = rows [0, P).
  PREFIX_TUNING  `prompt_embeddings` is (P, L*2*H*D), L = config.num_layers. PEFT views it as
                 (P, 2L, H, D), duplicates it to 4L rows, and cuts those into L chunks of 4
                 (self K, self V, cross K, cross V) for an EncoderDecoderCache; then it replaces
                 the cross-attention half with an empty cache. So only the decoder's
                 self-attention gets a prefix, and decoder layer l reads PEFT's layer (2l mod L):
                 with L = 2 both layers read layer 0. -> our `decoder` part
                 = kv[(2l) mod L] for l in range(L); no encoder or cross part.
Exporting to PEFT is not offered: a PEFT seq2seq prefix cannot express our encoder and cross
parts, nor a decoder prefix whose layers differ where PEFT's mapping repeats them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from softprompt.families.seq2seq.core import Seq2SeqError, is_seq2seq, seq2seq_geometry
from softprompt.families.seq2seq.methods import Seq2SeqPrefixTuning, Seq2SeqPromptTuning


def peft_prefix_to_decoder(emb: torch.Tensor, num_layers: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's (P, L*2*H*D) -> our decoder part (L, 2, H, P, D), following PEFT's layer mapping."""
    P = emb.shape[0]
    kv = emb.reshape(P, num_layers, 2, num_heads, head_dim).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
    return torch.stack([kv[(2 * layer) % num_layers] for layer in range(num_layers)]).contiguous()


def import_peft(path: Path, cfg: dict, emb: torch.Tensor, model):
    """A PEFT SEQ_2_SEQ_LM adapter (config `cfg`, tensor `emb`) as one of our seq2seq prompts."""
    if not is_seq2seq(model):
        raise Seq2SeqError(f"{path} is a PEFT adapter for an encoder-decoder model (task_type SEQ_2_SEQ_LM), but "
                           f"the base {getattr(model, 'name_or_path', type(model).__name__)!r} is decoder-only: "
                           "load it with a T5/BART base (--base PATH)")
    geo = seq2seq_geometry(model)
    peft_type, P = cfg.get("peft_type"), int(cfg.get("num_virtual_tokens") or 0)
    config = {"num_virtual_tokens": P, "source": "peft", "peft_type": peft_type}
    if peft_type == "PROMPT_TUNING":
        if emb.ndim != 2 or emb.shape[1] != geo.hidden_size or emb.shape[0] < P:
            raise Seq2SeqError(f"{path}: prompt embeddings of shape {tuple(emb.shape)} do not fit this model "
                               f"(needs at least ({P}, {geo.hidden_size}))")
        return Seq2SeqPromptTuning.from_export(geo, config, {"prompt_embeddings": emb[:P]})
    if peft_type == "PREFIX_TUNING":
        L = int(cfg.get("num_layers") or geo.decoder_layers)
        if L != geo.decoder_layers or tuple(emb.shape) != (P, L * 2 * geo.kv_dim):
            raise Seq2SeqError(f"{path}: prefix of shape {tuple(emb.shape)} (num_layers={cfg.get('num_layers')}) "
                               f"does not fit this model, which needs ({P}, {geo.decoder_layers * 2 * geo.kv_dim})")
        dec = peft_prefix_to_decoder(emb, L, geo.num_heads, geo.head_dim)
        return Seq2SeqPrefixTuning.from_export(geo, config, {"prefix_decoder": dec})
    raise Seq2SeqError(f"{path}: PEFT type {peft_type!r} is not imported for encoder-decoder models "
                       "(supported: PROMPT_TUNING, PREFIX_TUNING)")
