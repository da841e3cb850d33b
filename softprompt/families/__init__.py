"""Model families: one protocol (`Family`, base.py), one module per family, chosen once from the
model's config. Generic code (artifact, store, runs, cli, serve, api) asks `family_of(model)` and
never names a family; tests/test_boundary.py checks that it does not import one either.

    causal   decoder-only LMs (Llama, Qwen, Mistral, Gemma, GPT-2, OPT, Phi-3, GPT-NeoX, ...)
    seq2seq  encoder-decoders (T5, BART): a prompt has up to four parts (softprompt/families/seq2seq/)
    encoder  bidirectional encoders (BERT family): deep prompts for classification only

Adding a family is one new module here (a `Family` subclass) plus its tests; its entry in
`FAMILIES` (tried in order, the first whose `matches(config)` wins) is the only line elsewhere.
"""

from __future__ import annotations

import importlib

from softprompt.families.base import Family, FamilyRefusal

FAMILIES = {  # name -> "module:Class", imported on first use (most processes need one family)
    "seq2seq": "softprompt.families.seq2seq:Seq2SeqFamily",
    "encoder": "softprompt.families.encoder:EncoderFamily",
    "causal_lm": "softprompt.families.causal:CausalFamily",  # last: what every other decoder is
}
# What a card without `model_family` was made for (cards written before seq2seq support are all
# decoder prompts), and the family of an in-memory prompt whose class names none (the decoder methods)
UNNAMED = "causal_lm"
_loaded: dict[str, Family] = {}


def family_named(name: str) -> Family:
    """The family recorded on a card as `model_family`."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    if name not in _loaded:
        module, cls = FAMILIES[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


def family_of(model_or_config) -> Family:
    """The family of a model (or of its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    for name in FAMILIES:
        family = family_named(name)
        if family.matches(config):
            return family
    raise AssertionError("the causal family matches every config")  # pragma: no cover


def card_family(card: dict) -> str:
    """The family a card's prompt was made for (`model_family`, recorded by every writer since it existed)."""
    return card.get("model_family") or UNNAMED


def prompt_family(prompt) -> str:
    """The family an in-memory prompt was made for: its class's `family`, else its card's."""
    return getattr(prompt, "family", None) or card_family(getattr(prompt, "card", None) or {})


__all__ = ["FAMILIES", "Family", "FamilyRefusal", "card_family", "family_named", "family_of", "prompt_family"]
