"""Issue 28's machinery on tiny models: subsets of distinct inputs (reproducible per seed, nested),
full fine-tuning (its loss falls, its saved model reloads with the same logits), and `softprompt
compare --train-sizes --seeds` end to end (table with intervals, curve PNG)."""

import json

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer

from softprompt.loops.data import Example, subset_inputs
from softprompt.runs.compare import CompareConfig, run_compare, steps_for
from softprompt.runs.config import RunConfig


def _examples():
    # 12 distinct inputs, input i with 1 + i % 3 references, rows interleaved as a CSV would give them
    rows = [Example(f"{WORDS[i]} {WORDS[i + 1]}", f"{WORDS[20 + k]} {WORDS[30 + i]}") for k in range(3)
            for i in range(12) if k <= i % 3]
    return rows


def test_a_subset_is_distinct_inputs_with_all_their_rows():
    ex = _examples()
    sub = subset_inputs(ex, 5, seed=0)
    inputs = set(e.prompt for e in sub)
    assert len(inputs) == 5
    assert sub == [e for e in ex if e.prompt in inputs]  # every row of each drawn input, in the rows' order


def test_a_subset_is_reproducible_per_seed_and_nested():
    ex = _examples()
    draws = {seed: [set(e.prompt for e in subset_inputs(ex, n, seed)) for n in (2, 5, 9)] for seed in range(4)}
    for seed in range(4):
        assert draws[seed] == [set(e.prompt for e in subset_inputs(ex, n, seed)) for n in (2, 5, 9)]
        small, mid, large = draws[seed]
        assert small < mid < large  # the 2 inside the 5 inside the 9, for one seed
    assert len({frozenset(d[1]) for d in draws.values()}) > 1  # other seeds draw other inputs
    assert subset_inputs(ex, 100, 0) == ex
    with pytest.raises(ValueError):
        subset_inputs(ex, 0, 0)


def test_steps_scale_with_the_subset_by_the_printed_rule():
    from softprompt.runs.compare import steps_rule

    cfg = CompareConfig(RunConfig.of(steps=10, batch_size=8), epochs=2.0, max_steps=100)
    assert [steps_for(n, cfg) for n in (8, 80, 400, 4000)] == [10, 20, 100, 100]
    assert steps_rule(cfg) == "steps = ceil(2 epochs x training rows / batch 8), at least 10, at most 100"
    capped = CompareConfig(RunConfig.of(steps=50, batch_size=8), epochs=2.0, max_steps=40)
    assert [steps_for(n, capped) for n in (8, 4000)] == [40, 40]  # a cap under the floor: the cap decides
    assert steps_rule(capped) == "steps = ceil(2 epochs x training rows / batch 8), at most 40"


def _tokenized(tok):
    from softprompt.loops.data import DataConfig, tokenize

    return tokenize(_examples(), tok, DataConfig())


def test_full_fine_tuning_lowers_the_loss_and_its_saved_model_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from softprompt.loops.train import eval_loss
    from softprompt.runs.compare import FullFineTune, train_full

    model, tok = tiny_model("llama"), tiny_tokenizer()
    data = _tokenized(tok)
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = eval_loss(FullFineTune(model), model, data, 8, tok.pad_token_id)
    run = RunConfig.of(steps=30, batch_size=8, lr=3e-3, progress=False)
    tuned, n_params, after, _ = train_full(model, tok, data, data, run, 3e-3, tmp_path / "model")
    assert after < before - 0.5, (before, after)
    assert n_params == sum(p.numel() for p in model.parameters())  # every weight trained
    assert all(torch.equal(v, before_weights[k]) for k, v in model.state_dict().items())  # the base untouched
    assert any((tmp_path / "model").glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.tensor([[5, 17, 33, 8, 41]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tuned(ids).logits, rtol=0, atol=1e-5)


def test_compare_flags_parse_into_the_curve_config():
    from softprompt.cli import parse_config_command

    cfg = parse_config_command("compare", ["--data", "d.jsonl", "--methods", "prefix,lora,full", "--train-sizes",
                                           "50,200", "--seeds", "0,1", "--num-beams", "5", "--length-penalty", "0.8"])
    assert cfg.methods == ("prefix_tuning", "lora", "full") and cfg.train_sizes == (50, 200) and cfg.seeds == (0, 1)
    assert (cfg.num_beams, cfg.length_penalty) == (5, 0.8)
    with pytest.raises(ValueError, match="unknown method"):
        CompareConfig(methods=("prefix_tuning", "adapters"))


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve")
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps({"input": e.prompt, "output": e.target}) + "\n" for e in _examples()))
    heldout = tmp / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in
                               [("fa fe", "da de"), ("fi fo", "da di"), ("fa fe", "do du")]))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("softprompt.loops.train.plot_history", lambda *a, **k: None)
        run = RunConfig.of(train_data=str(train), out=str(tmp / "out"), eval_data=str(heldout), steps=2,
                           batch_size=4, num_virtual_tokens=2, progress=False)
        rep = run_compare(CompareConfig(run, methods=("prefix_tuning", "lora", "full"), lora_r=2, eval_inputs=2,
                                        eval_max_new_tokens=3, train_sizes=(2, 4), seeds=(0, 1), epochs=1.0,
                                        max_steps=3, bootstrap_samples=50, num_beams=2, full_lr=1e-3), model, tok)
    return rep, tmp / "out", model, tok


def test_the_curve_trains_every_method_per_size_and_seed(curve):
    rep, out, _, _ = curve
    assert len(rep["cells"]) == 3 * 2 * 2
    assert {(c["method"], c["size"], c["seed"]) for c in rep["cells"]} == \
        {(m, n, s) for m in ("prefix_tuning", "lora", "full") for n in (2, 4) for s in (0, 1)}
    for c in rep["cells"]:
        assert c["train_inputs"] == c["size"] and c["steps"] == min(3, max(2, -(-c["train_rows"] // 4)))
        assert c["bleu"] is not None and c["bleu_beam"] is not None and c["bleu_low"] <= c["bleu_high"]
    # the same subset for every method of a cell; nested across sizes for one seed
    subsets = {(n, s): set(json.loads(x)["input"] for x in (out / f"n{n}" / f"seed{s}" / "data" / "train.jsonl")
                           .read_text().splitlines()) for n in (2, 4) for s in (0, 1)}
    assert subsets[2, 0] < subsets[4, 0] and subsets[2, 1] < subsets[4, 1]
    assert (out / "n2" / "seed0" / "full" / "model").is_dir()


def test_the_curve_reports_mean_spread_intervals_and_p_values(curve):
    from softprompt.loops.evaluate import paired_bootstrap

    rep, out, _, _ = curve
    assert [(p["size"], p["method"]) for p in rep["points"]] == \
        [(n, m) for n in (2, 4) for m in ("prefix_tuning", "lora", "full")]
    for p in rep["points"]:
        cells = [c for c in rep["cells"] if c["size"] == p["size"] and c["method"] == p["method"]]
        assert p["bleu_mean"] == pytest.approx(sum(c["bleu"] for c in cells) / 2)
        assert p["bleu_low"] <= p["bleu_high"] and p["seeds"] == 2
        assert (p["p_value"] is None) == (p["method"] == "prefix_tuning")
    # pooled: the two seeds' outputs one after the other, each against its input's references
    outs = {(m, s): [json.loads(x) for x in (out / "n4" / f"seed{s}" / m / "predictions.jsonl").read_text()
                     .splitlines()] for m in ("prefix_tuning", "lora", "full") for s in (0, 1)}
    systems = {m: [o["output"] for s in (0, 1) for o in outs[m, s]] for m in ("prefix_tuning", "lora", "full")}
    refs = [o["references"] for s in (0, 1) for o in outs["lora", s]]
    want = paired_bootstrap(systems, refs, "prefix_tuning", 50)
    got = {p["method"]: p for p in rep["points"] if p["size"] == 4}
    for m in systems:
        assert got[m]["bleu_pooled"] == pytest.approx(want[m]["bleu"])
        assert got[m]["p_value"] == want[m]["p_value"]
    md = (out / "compare.md").read_text()
    assert md.count("\n| ") == 6 and "BLEU pooled [95% interval]" in md and "p vs prefix_tuning" in md
    assert "at least 2, at most 3" in md and "beam" in md
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(rep))
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
