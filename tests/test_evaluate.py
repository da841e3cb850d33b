"""Evaluation: multi-reference metrics, greedy and beam decoding, the eval job."""

import json

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.loops.evaluate import beam_search, predict, score
from softprompt.loops.generate import generate


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
    from softprompt.hf.prefix import prefixed_forward

    p = tok(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([p + ids])
    logits = prefixed_forward(model, x, torch.ones_like(x), [kv], use_cache=False).logits[0].log_softmax(-1)
    return sum(float(logits[len(p) - 1 + i, t]) for i, t in enumerate(ids))


def test_beam_search(setup):
    from softprompt.loops.generate import SamplingParams, generate_ids

    model, tok, kv = setup
    eos = tok.eos_token_id
    x = torch.tensor([tok("ba be bi", add_special_tokens=False)["input_ids"]])
    greedy = generate_ids(model, x, torch.ones_like(x), [kv], SamplingParams(max_new_tokens=5), {eos})[0]
    # one beam is greedy decoding, up to (not including) eos
    assert beam_search(model, tok, "ba be bi", kv, num_beams=1, max_new_tokens=5) == [t for t in greedy if t != eos]
    ids4 = beam_search(model, tok, "ba be bi", kv, num_beams=4, max_new_tokens=5, length_penalty=0.0)
    # length_penalty 0 ranks by total log-probability (eos included when the beam ended on it): the
    # wider search finds a sequence at least as likely as greedy's, and here a strictly likelier one
    def total(ids):
        return _logprob(model, tok, kv, "ba be bi", ids + ([eos] if len(ids) < 5 else []))
    assert ids4 != greedy and total(ids4) > total(greedy) + 1e-3
    assert predict(model, tok, ["ba be bi"], kv, max_new_tokens=5, num_beams=4)[0] == tok.decode(
        beam_search(model, tok, "ba be bi", kv, num_beams=4, max_new_tokens=5), skip_special_tokens=True).strip()


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_transformers(num_beams):
    """An independent reference: transformers' own beam search (no prefix: `generate` takes none), with
    length_penalty 0 (sum of log-probabilities) on prompts where beams end on eos and where they don't."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    eos = tok.eos_token_id
    for text in ["ba be bi", "co cu", "da de di do du", "fa"]:
        x = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        for n in (5, 12):
            want = model.generate(x, attention_mask=torch.ones_like(x), num_beams=num_beams, max_new_tokens=n,
                                  length_penalty=0.0, do_sample=False, early_stopping=False, eos_token_id=eos,
                                  pad_token_id=0)[0, x.shape[1]:].tolist()
            want = want[:want.index(eos)] if eos in want else want
            assert beam_search(model, tok, text, None, num_beams=num_beams, max_new_tokens=n,
                               length_penalty=0.0) == want, (text, n)


def test_eval_job(setup, tmp_path, capsys):
    from softprompt.io.artifact import save_artifact
    from softprompt.runs.config import EvalConfig
    from softprompt.runs.train import run_eval

    model, tok, _ = setup
    prompt = methods.create("prompt_tuning", model, None, num_virtual_tokens=2)
    save_artifact(prompt, tmp_path / "a", model)
    f = tmp_path / "d.csv"
    f.write_text("mr,ref\nba be,bi\nco,cu\nba be,bo\n")
    cfg = EvalConfig.of(adapter=str(tmp_path / "a"), eval_data=str(f), template="{mr} ||", target="ref",
                        max_new_tokens=3, predictions=str(tmp_path / "p.jsonl"))
    res = run_eval(cfg, model, tok)
    assert res["n"] == 2 and res["references"] == 3
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines[0]["references"] == ["bi", "bo"] and lines[0]["prompt"] == "ba be ||"
    assert "BLEU" in capsys.readouterr().out
