"""Beam search (the paper's decoding: Li & Liang report beam 5) is transformers' own: the same beam
as `generate(num_beams=5)` on the bare model, and as PEFT's `generate(num_beams=5)` with the same
prompt inside (our KV prefix or soft prompt against PEFT's), on tiny random models."""

import pytest
import torch
from conftest import ROWS, tiny_model
from test_engine import WordTok, text
from test_peft_oracle import paired, peft_greedy

from softprompt.loops.evaluate import beam_search

BEAMS, NEW = 5, 8


def theirs(model, row, eos):
    x = torch.tensor([row])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), num_beams=BEAMS, max_new_tokens=NEW,
                             do_sample=False, length_penalty=1.0, early_stopping=False, eos_token_id=eos,
                             pad_token_id=0)
    ids = out[0, len(row):].tolist()
    return ids[:ids.index(eos)] if eos in ids else ids  # ours leaves the end token out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_bare_model_beam_equals_transformers(arch):
    model = tiny_model(arch)
    tok = WordTok()
    for row in ROWS:
        assert beam_search(model, tok, text(row), None, num_beams=BEAMS, max_new_tokens=NEW) == \
            theirs(model, row, tok.eos_token_id)


@pytest.mark.parametrize("case", ["prefix_mlp", "prompt"])
def test_prompted_beam_equals_peft(case):
    model = tiny_model("llama")
    ours, peft = paired(model, case)
    peft_greedy(peft, ROWS[0], NEW)  # skips, naming the versions, where PEFT's own generation is broken
    tok = WordTok()
    with torch.no_grad():
        kv = ours.to_kv_prefix(model)
    for row in ROWS:
        assert beam_search(model, tok, text(row), kv, num_beams=BEAMS, max_new_tokens=NEW) == \
            theirs(peft, row, tok.eos_token_id)
