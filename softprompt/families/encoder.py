"""Bidirectional encoders (BERT family): deep prompts (a K/V prefix at every layer, P-tuning v2) or
a soft prompt after [CLS], for classification (softprompt/encoder.py, softprompt/classify/). They
do not generate text: those parts of the protocol refuse in one line."""

from __future__ import annotations

from .base import Family

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "camembert", "deberta",
                 "deberta-v2", "ernie", "modernbert")


class EncoderFamily(Family):
    name = "encoder"
    description = "encoder"
    padding_side = "right"

    @staticmethod
    def matches(config) -> bool:
        return getattr(config, "model_type", None) in ENCODER_TYPES and not getattr(config, "is_decoder", False)

    def geometry(self, model):
        from ..models import geometry

        return geometry(model)

    def methods(self) -> dict:
        from ..methods import METHODS

        return {name: cls for name, cls in METHODS.items() if name in ("prefix_tuning", "prompt_tuning")}

    def accepts_card_family(self, name: str) -> bool:
        return name in (self.name, "causal_lm")  # cards written before this family existed say causal_lm

    def create(self, method, model, tokenizer=None, **options):
        from ..methods import create

        return create(method, model, tokenizer, **options)
