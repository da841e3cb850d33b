"""Decoder-only LMs: a prompt is a KV prefix before the text (softprompt/prefix.py); every method
compiles to one, so serving mixes tasks in one continuous batch."""

from __future__ import annotations

from .base import Family


class CausalFamily(Family):
    name = "causal_lm"
    description = "decoder-only"
    padding_side = "left"  # a batch's last column is every row's last real token
    peft_task_types = ("CAUSAL_LM",)
    flat_prefix = True

    @staticmethod
    def matches(config) -> bool:
        return True  # tried last: whatever is neither an encoder-decoder nor an encoder

    def auto_model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def geometry(self, model):
        from ..models import geometry

        return geometry(model)

    def methods(self) -> dict:
        from ..methods import METHODS

        return METHODS

    def create(self, method, model, tokenizer=None, **options):
        from ..methods import create

        return create(method, model, tokenizer, **options)

    def tokenize(self, examples, tokenizer, cfg, bad=None):
        from ..data import tokenize

        return tokenize(examples, tokenizer, cfg, bad)

    def objective(self):
        from ..train import CausalLMObjective

        return CausalLMObjective()

    def generate(self, model, tokenizer, prompts, prefix, params):
        from ..generate import generate

        return generate(model, tokenizer, prompts, prefix, params)

    def evaluate_groups(self, model, tokenizer, groups, prefix, **options) -> dict:
        from ..evaluate import evaluate_groups

        return evaluate_groups(model, tokenizer, groups, prefix, **options)

    def engine_class(self):
        from ..serve.engine import Engine

        return Engine
