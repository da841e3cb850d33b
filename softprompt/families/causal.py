"""Decoder-only LMs: a prompt is a KV prefix before the text (softprompt/hf/prefix.py); every method
compiles to one, so serving mixes tasks in one continuous batch."""

from __future__ import annotations

from softprompt.families.base import Family


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
        from softprompt.core.geometry import geometry

        return geometry(model)

    def methods(self) -> dict:
        from softprompt.methods import METHODS

        return METHODS

    def create(self, method, model, tokenizer=None, **options):
        from softprompt.methods import create

        return create(method, model, tokenizer, **options)

    def tokenize(self, examples, tokenizer, cfg, bad=None):
        from softprompt.loops.data import tokenize

        return tokenize(examples, tokenizer, cfg, bad)

    def objective(self):
        from softprompt.loops.train import CausalLMObjective

        return CausalLMObjective()

    def generate(self, model, tokenizer, prompts, prefix, params):
        from softprompt.loops.generate import generate

        return generate(model, tokenizer, prompts, prefix, params)

    def evaluate_groups(self, model, tokenizer, groups, prefix, **options) -> dict:
        from softprompt.loops.evaluate import evaluate_groups

        return evaluate_groups(model, tokenizer, groups, prefix, **options)
