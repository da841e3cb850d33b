"""Which engine serves which family: continuous batching with per-row KV prefixes for decoders
(engine.py), batch-at-a-time for encoder-decoders (seq2seq.py). Families sit below serving
(tests/test_layering.py), so the choice is made here, up on the floor that knows both."""

from __future__ import annotations

from softprompt.families import Family, FamilyRefusal

ENGINES = {  # family name -> "module:class", imported on first use
    "causal_lm": "softprompt.serve.engine:Engine",
    "seq2seq": "softprompt.serve.seq2seq:Seq2SeqEngine",
}


def engine_class(family: Family):
    """The engine class that serves `family`'s generation tasks; a one-line refusal for a family
    that does not generate (an encoder's tasks are classifiers, served by POST /v1/classify)."""
    if family.name not in ENGINES:
        raise FamilyRefusal(f"{family.name} models are not served by the generation engine; POST /v1/classify "
                            "serves classifiers")
    import importlib

    module, cls = ENGINES[family.name].split(":")
    return getattr(importlib.import_module(module), cls)
