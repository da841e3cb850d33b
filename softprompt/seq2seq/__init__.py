"""Encoder-decoder models (T5, BART families): prefix tuning at three sites, prompt tuning on the
encoder input, training objective, generation, artifacts and PEFT import. See core.py."""

from .core import (PARTS, Seq2SeqError, Seq2SeqGeometry, Seq2SeqPrefix, is_seq2seq, model_family,
                   seq2seq_forward, seq2seq_geometry)
from .methods import METHODS, Seq2SeqPrefixConfig, Seq2SeqPrefixTuning, Seq2SeqPromptTuning, create

__all__ = ["PARTS", "Seq2SeqError", "Seq2SeqGeometry", "Seq2SeqPrefix", "is_seq2seq", "model_family",
           "seq2seq_forward", "seq2seq_geometry", "METHODS", "Seq2SeqPrefixConfig", "Seq2SeqPrefixTuning",
           "Seq2SeqPromptTuning", "create"]
