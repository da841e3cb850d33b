"""Encoder-decoder LMs (T5, BART): a prompt has up to four parts (soft prompt before the encoder
input, encoder, decoder and cross-attention K/V prefixes; softprompt/families/seq2seq/), batch-at-a-time
serving (softprompt/serve/seq2seq.py)."""

from __future__ import annotations

from softprompt.families.base import Family, from_fields


class Seq2SeqFamily(Family):
    name = "seq2seq"
    description = "encoder-decoder"
    padding_side = "right"  # encoder inputs: real tokens keep positions 0, 1, ...
    peft_task_types = ("SEQ_2_SEQ_LM",)
    steps = {step: f"softprompt.families.seq2seq.{where}" for step, where in (
        ("geometry", "core:seq2seq_geometry"), ("methods", "methods:METHODS"), ("create", "methods:create"),
        ("tokenize", "train:tokenize_seq2seq"), ("objective", "train:Seq2SeqObjective"),
        ("generate", "generate:generate"), ("evaluate_groups", "generate:evaluate_groups"),
        ("import_peft", "peft_io:import_peft"))}

    @staticmethod
    def matches(config) -> bool:
        return bool(getattr(config, "is_encoder_decoder", False))

    def auto_model_class(self):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def card_geometry(self, geo: dict):
        from softprompt.families.seq2seq.core import Seq2SeqGeometry

        return from_fields(Seq2SeqGeometry, geo)

    def shape_options(self, card: dict) -> dict:
        return {"config": card.get("config")}  # which of the four parts a prefix has

    def load_prefix(self, tensors: dict):
        from softprompt.families.seq2seq.core import Seq2SeqPrefix

        return Seq2SeqPrefix.from_tensors(tensors)
