"""Bidirectional encoders (BERT family): deep prompts (a K/V prefix at every layer, P-tuning v2) or
a soft prompt after [CLS], for classification (softprompt/classify/). They do not generate text:
those parts of the protocol refuse in one line. The embedded encoder loads in softprompt/io/load.py.

Two ways a prompt enters an encoder, mirroring the decoder side:

  deep prompt (prefix tuning at every layer, P-tuning v2): a KV prefix `(L, 2, H, P, D)` whose
      keys/values are prepended to every layer's self-attention. BERT has no grouped-query
      attention, so H = num_attention_heads. The encoder is bidirectional, so every real token
      attends to the P prefix slots (the mask is extended with ones) and the prefix attends to
      nothing (it has no queries). It enters through transformers' own cache argument: BertModel's
      self-attention calls `cache.update(k, v)`, which concatenates our prefix in front.
      Positions: real tokens keep the encoder's own positions 0, 1, ... by default; `shift_positions`
      gives them P, P+1, ... as PEFT and the P-tuning v2 code do (BertModel counts the cache as past),
      so a PEFT prefix gives the same logits.
  soft prompt (prompt tuning): P input embeddings spliced in right after [CLS], so [CLS] keeps
      position 0 and the text follows at P+1, P+2, ...; the prompt's output columns are dropped.

Padding is on the right (BERT's own convention): positions then never depend on padding.
"""

from __future__ import annotations

import torch

from softprompt import hf
from softprompt.families.base import Family
from softprompt.hf.prefix import stack_prefixes

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "camembert", "deberta",
                 "deberta-v2", "ernie", "modernbert")
POOLINGS = ("mean", "cls")


def is_encoder_config(config) -> bool:
    """The one test of "a bidirectional encoder" (BERT, RoBERTa, ...), not a causal LM or an
    encoder-decoder, that family_of, the loaders and classification all use."""
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return False
    return getattr(config, "model_type", None) in ENCODER_TYPES


class EncoderFamily(Family):
    name = "encoder"
    description = "encoder"
    padding_side = "right"

    @staticmethod
    def matches(config) -> bool:
        return is_encoder_config(config)

    steps = {"geometry": "softprompt.core.geometry:geometry", "create": "softprompt.methods:create"}

    def methods(self) -> dict:
        from softprompt.methods import METHODS

        return {name: cls for name, cls in METHODS.items() if name in ("prefix_tuning", "prompt_tuning")}

    def accepts_card_family(self, name: str) -> bool:
        return name in (self.name, "causal_lm")  # cards written before this family existed say causal_lm


# --------------------------------------------------------------------------------------------
# Running an encoder with a prompt

def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, prefix: torch.Tensor | None = None,
           soft_prompt: torch.Tensor | None = None, shift_positions: bool = False) -> torch.Tensor:
    """Last hidden states `(B, T, d)` of the real token columns, with at most one kind of prompt.

    input_ids, attention_mask: (B, T), right-padded, column 0 is [CLS].
    prefix: `(L, 2, H, P, D)` deep prompt (differentiable); soft_prompt: `(P, d)` input embeddings.
    shift_positions: with a deep prompt, real tokens take positions P, P+1, ... (PEFT's and P-tuning
    v2's convention, for identical logits with their adapters) instead of the encoder's own 0, 1, ...
    A prefix has no position of its own (its keys are given), and an absolute-position encoder never
    saw [CLS] anywhere but 0, so the default keeps them: +1.1 points on SST-2 (bench/quality_sst2.py).
    """
    B, T = input_ids.shape
    if prefix is not None and soft_prompt is not None:
        raise ValueError("give a deep prompt or a soft prompt, not both")
    if soft_prompt is not None:
        P = soft_prompt.shape[0]
        emb = model.get_input_embeddings()(input_ids)  # (B, T, d)
        sp = soft_prompt.to(emb.dtype).unsqueeze(0).expand(B, P, -1)  # (B, P, d)
        inputs_embeds = torch.cat([emb[:, :1], sp, emb[:, 1:]], dim=1)  # (B, 1+P+T-1, d)
        ones = attention_mask.new_ones(B, P)
        mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)  # (B, P+T)
        h = model(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state  # (B, P+T, d)
        return torch.cat([h[:, :1], h[:, 1 + P:]], dim=1)  # (B, T, d): the prompt's columns dropped
    if prefix is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    kv, pmask = stack_prefixes([prefix], batch_size=B)  # (L, 2, B, H, P, D), (B, P)
    mask = torch.cat([pmask.to(attention_mask), attention_mask], dim=1)  # (B, P+T): every token sees the prefix
    first = kv.shape[-2] if shift_positions else 0  # explicit either way: releases differ in what None means
    pos = torch.arange(first, first + T, device=input_ids.device).expand(B, T)
    out = hf.forward(model, hf.new_cache(kv, model=model), input_ids=input_ids, attention_mask=mask, position_ids=pos)
    return out.last_hidden_state  # (B, T, d): the prefix has no output column


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(B, T, d) -> (B, d): the mean over real tokens (all-MiniLM-L6-v2 was trained to be read this
    way), or the [CLS] column."""
    if how == "cls":
        return hidden[:, 0]
    if how != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def text_prefix(model, tokenizer, text: str, num_virtual_tokens: int) -> torch.Tensor:
    """An encoder's own keys/values over a text, `(L, 2, H, P, D)`: the "activations of real words"
    initialization of Li & Liang, read from the same cache hook the deep prompt enters through.
    The text's tokens are repeated or cut to P (without [CLS]/[SEP])."""
    from softprompt.methods.prompt_tuning import repeat_to

    ids = repeat_to(tokenizer(text, add_special_tokens=False)["input_ids"], num_virtual_tokens)
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    cache = hf.forward(model, hf.new_cache(), input_ids=x, attention_mask=torch.ones_like(x)).cache
    return hf.to_prefix(cache, row=0).float().cpu()

