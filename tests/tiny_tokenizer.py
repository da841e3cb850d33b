"""A tiny offline word-level tokenizer whose vocabulary matches the tiny models' (96 ids).

ids 0..3 are [PAD] [BOS] [EOS] [UNK] (the tiny models' pad/bos/eos ids are 0/1/2); ids 4..95 are
two-letter words "ba", "be", ..., so every id decodes to a word and, since all words have the same
length and are joined by spaces, a two-letter stop string can only match a whole word.
"""

import itertools

import pytest

WORDS = [c + v for c, v in itertools.product("bcdfghjklmnpqrstvwxyz", "aeiou")][:92]
SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]


def tiny_tokenizer(pad: bool = True):
    """A `PreTrainedTokenizerFast` over SPECIALS + WORDS, padding on the left."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = dict(eos_token="[EOS]", bos_token="[BOS]", unk_token="[UNK]")
    if pad:
        specials["pad_token"] = "[PAD]"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tok.padding_side = "left"
    return tok


def word_id(word: str) -> int:
    return 4 + WORDS.index(word)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()
