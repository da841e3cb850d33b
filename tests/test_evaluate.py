"""Evaluation: multi-reference metrics, greedy and beam decoding, the eval job."""

import json

import pytest
import torch

from conftest import tiny_model
from softprompt import methods
from softprompt.evaluate import beam_search, predict, score
from softprompt.generate import generate
from tiny_tokenizer import tiny_tokenizer


def test_metrics_are_multi_reference():
    refs = [["the cat sat on the mat", "a cat was sitting on the mat"], ["positive"]]
    s = score(["a cat was sitting on the mat", "positive"], refs)
    assert s["bleu"] == pytest.approx(100.0) and s["rouge_l"] == pytest.approx(100.0)
    assert s["exact_match"] == 100.0 and s["accuracy"] == 100.0
    assert score(["Positive."], [["positive"]])["exact_match"] == 100.0  # case and punctuation normalized
    only_first = score(["a cat was sitting on the mat", "positive"], [["the cat sat on the mat"], ["positive"]])
    assert only_first["bleu"] < 60 and only_first["exact_match"] == 50.0
    s = score(["negative, clearly", "no"], [["negative"], ["yes"]])
    assert s["accuracy"] == 50.0 and s["exact_match"] == 0.0
    with pytest.raises(ValueError):
        score(["x"], [["a"], ["b"]])


@pytest.fixture
def setup():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    prompt = methods.create("prefix_tuning", model, None, num_virtual_tokens=3, projection_dim=0)
    return model, tok, prompt.to_kv_prefix(model)


def test_greedy_predict_equals_generate(setup):
    model, tok, kv = setup
    prompts = ["ba be bi", "co cu", "da de di do du"]
    want = generate(model, tok, prompts, kv, max_new_tokens=6)
    assert predict(model, tok, prompts, kv, max_new_tokens=6, batch_size=2, stop=()) == [w.strip() for w in want]


def _logprob(model, tok, kv, prompt, ids):
    from softprompt.prefix import prefixed_forward

    p = tok(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([p + ids])
    logits = prefixed_forward(model, x, torch.ones_like(x), [kv], use_cache=False).logits[0].log_softmax(-1)
    return sum(float(logits[len(p) - 1 + i, t]) for i, t in enumerate(ids))


def test_beam_search(setup):
    model, tok, kv = setup
    eos = tok.eos_token_id
    greedy = generate(model, tok, ["ba be bi"], kv, max_new_tokens=5, ignore_eos=True)
    ids1 = beam_search(model, tok, "ba be bi", kv, num_beams=1, max_new_tokens=5)
    if eos not in ids1:
        assert tok.decode(ids1) == greedy[0]
    ids4 = beam_search(model, tok, "ba be bi", kv, num_beams=4, max_new_tokens=5, length_penalty=0.0)
    assert len(ids4) >= 1
    if len(ids4) == 5 and len(ids1) == 5:  # same length: the wider search is at least as likely
        assert _logprob(model, tok, kv, "ba be bi", ids4) >= _logprob(model, tok, kv, "ba be bi", ids1) - 1e-4
    assert predict(model, tok, ["ba be bi"], kv, max_new_tokens=5, num_beams=4)[0] == tok.decode(
        beam_search(model, tok, "ba be bi", kv, num_beams=4, max_new_tokens=5), skip_special_tokens=True).strip()


def test_eval_job(setup, tmp_path, capsys):
    from softprompt.artifact import save_artifact
    from softprompt.runs import run_eval

    model, tok, _ = setup
    prompt = methods.create("prompt_tuning", model, None, num_virtual_tokens=2)
    save_artifact(prompt, tmp_path / "a", model)
    f = tmp_path / "d.csv"
    f.write_text("mr,ref\nba be,bi\nco,cu\nba be,bo\n")
    res = run_eval(str(tmp_path / "a"), str(f), template="{mr} ||", target="ref", max_new_tokens=3,
                   predictions=str(tmp_path / "p.jsonl"), model=model, tokenizer=tok)
    assert res["n"] == 2 and res["references"] == 3
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines[0]["references"] == ["bi", "bo"] and lines[0]["prompt"] == "ba be ||"
    assert "BLEU" in capsys.readouterr().out
