"""Encoder-decoder LMs (T5, BART): a prompt has up to four parts (soft prompt before the encoder
input, encoder, decoder and cross-attention K/V prefixes; softprompt/families/seq2seq/), batch-at-a-time
serving (softprompt/serve/seq2seq.py)."""

from __future__ import annotations

from softprompt.families.base import Family


class Seq2SeqFamily(Family):
    name = "seq2seq"
    description = "encoder-decoder"
    padding_side = "right"  # encoder inputs: real tokens keep positions 0, 1, ...
    peft_task_types = ("SEQ_2_SEQ_LM",)

    @staticmethod
    def matches(config) -> bool:
        return bool(getattr(config, "is_encoder_decoder", False))

    def auto_model_class(self):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def geometry(self, model):
        from softprompt.families.seq2seq.core import seq2seq_geometry

        return seq2seq_geometry(model)

    def methods(self) -> dict:
        from softprompt.families.seq2seq.methods import METHODS

        return METHODS

    def shape_options(self, card: dict) -> dict:
        return {"config": card.get("config")}  # which of the four parts a prefix has

    def create(self, method, model, tokenizer=None, **options):
        from softprompt.families.seq2seq.methods import create

        return create(method, model, tokenizer, **options)

    def prefix_to(self, prefix, device, dtype):
        import torch

        with torch.no_grad():
            return prefix.to(device=device, dtype=dtype)  # a Seq2SeqPrefix: each part moved

    def tokenize(self, examples, tokenizer, cfg, bad=None):
        from softprompt.families.seq2seq.train import tokenize_seq2seq

        return tokenize_seq2seq(examples, tokenizer, cfg, bad)

    def objective(self):
        from softprompt.families.seq2seq.train import Seq2SeqObjective

        return Seq2SeqObjective()

    def generate(self, model, tokenizer, prompts, prefix, params):
        from softprompt.families.seq2seq.generate import generate

        return generate(model, tokenizer, prompts, prefix, params)

    def evaluate_groups(self, model, tokenizer, groups, prefix, **options) -> dict:
        from softprompt.families.seq2seq.generate import evaluate_groups

        return evaluate_groups(model, tokenizer, groups, prefix, **options)


    def import_peft(self, path, config, embeddings, model):
        from softprompt.families.seq2seq.peft_io import import_peft

        prompt = import_peft(path, config, embeddings, model)
        prompt.card = {"method": prompt.method, "num_virtual_tokens": prompt.num_virtual_tokens, "source": "peft",
                       "path": str(path), "model_family": self.name,
                       "base_model": {"name": config.get("base_model_name_or_path")}, "peft_config": config}
        return prompt
