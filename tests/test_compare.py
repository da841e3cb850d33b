"""`softprompt compare` on a tiny llama: every method trained on the same data, a row each, scored
on the same held-out inputs (eval_loss, and BLEU/ROUGE-L of the outputs each method really generates).

Sizes are the smallest that still exercise every path (2 steps of 2 rows, P = 2, 2 tasks mixed, 2
scored inputs of 3 new tokens): the run is one compare, shared by the checks below."""

import json

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import tiny_tokenizer

from softprompt.runs.compare import CompareConfig, markdown, run_compare
from softprompt.runs.config import RunConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    words = ["ba be", "bi bo", "bu ca", "ce ci", "co cu"]
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps({"input": w, "output": "da de"}) + "\n" for w in words * 2))
    # 3 held-out inputs, the first with 2 references; only the first 2 inputs are scored
    heldout = tmp / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in
                               [("fa fe", "da de"), ("fi fo", "da di"), ("fa fe", "do du"), ("fu ga", "da de")]))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.MonkeyPatch.context() as mp:
        # each training run's own loss plot (train.py's, tested there) is half of this test's time
        mp.setattr("softprompt.loops.train.plot_history", lambda *a, **k: None)
        run = RunConfig.of(train_data=str(train), out=str(tmp / "out"), eval_data=str(heldout), steps=2,
                           batch_size=2, num_virtual_tokens=2, progress=False)
        rep = run_compare(CompareConfig(run, lora_r=2, max_new_tokens=2, tasks=2, eval_inputs=2,
                                        eval_max_new_tokens=3), model, tok)
    return rep, tmp / "out", model, tok


def test_a_row_per_method_with_every_figure(run):
    rep, out, _, _ = run
    assert [r["method"] for r in rep["rows"]] == ["prefix_tuning", "prompt_tuning", "lora"]
    assert rep["eval_inputs"] == 2 and rep["eval_references"] == 3
    # Sizes by hand for the tiny llama (d 48, 2 layers, 2 KV heads of 8: a layer's K or V is 16 wide), P = 2:
    # prefix tuning's MLP Embedding(2, 16) -> Linear(16, 512) -> Linear(512, 2 layers * (K, V) * 16), its
    # artifact the (2, 2, 2, 2, 8) float32 prefix; prompt tuning a (2, 48) prompt; LoRA r=2 on q (48->48) and
    # v (48->16) in 2 layers: A (2, 48) each, B (48, 2) and (16, 2). (BLEU/ROUGE-L: the next test.)
    params = {"prefix_tuning": 2 * 16 + (16 * 512 + 512) + (512 * 64 + 64), "prompt_tuning": 2 * 48,
              "lora": 2 * (2 * 48 + 48 * 2 + 2 * 48 + 16 * 2)}
    nbytes = {"prefix_tuning": 2 * 2 * 2 * 2 * 8 * 4, "prompt_tuning": 2 * 48 * 4, "lora": params["lora"] * 4}
    assert {r["method"]: r["trainable_parameters"] for r in rep["rows"]} == params
    assert {r["method"]: r["artifact_bytes"] for r in rep["rows"]} == nbytes
    for r in rep["rows"]:
        assert r["eval_loss"] == pytest.approx(heldout_loss_by_hand(out, r["method"]), rel=1e-5)
        assert r["tokens_per_s_1_task"] > 0 and r["tokens_per_s_mixed"] > 0  # timings: no exact value
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(rep))
    md = (out / "compare.md").read_text()
    assert md == markdown(rep) and md.count("\n| ") == 3
    assert "tok/s 2 tasks mixed" in md and "| BLEU | ROUGE-L |" in md and "2 held-out inputs (3 references)" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_scores_are_those_of_the_outputs_each_method_generates(run):
    from softprompt.io.artifact import load_artifact
    from softprompt.loops.evaluate import predict, score

    rep, out, _, tok = run
    for r in rep["rows"]:
        preds = [json.loads(line) for line in (out / r["method"] / "predictions.jsonl").read_text().splitlines()]
        assert [(p["prompt"], p["references"]) for p in preds] == [("fa fe", ["da de", "do du"]), ("fi fo", ["da di"])]
        s = score([p["output"] for p in preds], [p["references"] for p in preds])
        assert (s["bleu"], s["rouge_l"]) == pytest.approx((r["bleu"], r["rouge_l"]))
    # the outputs are those of the saved artifacts, regenerated independently on fresh copies of the
    # base (compare's own model is LoRA-injected by now: it trains LoRA last, in place)
    from softprompt.io.lora import apply_lora

    fresh = tiny_model("llama")
    with torch.no_grad():
        for method in ("prefix_tuning", "prompt_tuning"):
            kv = load_artifact(out / method / "last", fresh).to_kv_prefix(fresh)
            assert outputs(out / method) == predict(fresh, tok, ["fa fe", "fi fo"], kv, max_new_tokens=3)
        lora = apply_lora(tiny_model("llama"), out / "lora", merge=False)
        assert outputs(out / "lora") == predict(lora, tok, ["fa fe", "fi fo"], None, max_new_tokens=3)


def outputs(method_dir):
    return [json.loads(line)["output"] for line in (method_dir / "predictions.jsonl").read_text().splitlines()]


@torch.no_grad()
def heldout_loss_by_hand(out, method):
    """Target-token cross-entropy (target words + eos) over the first reference of each of the 2
    scored inputs (not "do du", their second), from the saved artifact on a fresh base, one row at a
    time with the full logits."""
    from softprompt.hf.prefix import prefixed_forward
    from softprompt.io.artifact import load_artifact
    from softprompt.io.lora import apply_lora

    tok = tiny_tokenizer()
    if method == "lora":
        model, kv = apply_lora(tiny_model("llama"), out / "lora", merge=False), None
    else:
        model = tiny_model("llama")
        kv = load_artifact(out / method / "last", model).to_kv_prefix(model)
    total, n = 0.0, 0
    for prompt, target in [("fa fe", "da de"), ("fi fo", "da di")]:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        x = torch.tensor([p + t])
        logp = prefixed_forward(model, x, torch.ones_like(x), [kv], use_cache=False).logits[0].log_softmax(-1)
        total -= sum(float(logp[len(p) - 1 + i, y]) for i, y in enumerate(t))
        n += len(t)
    return total / n


def test_peak_memory_counts_what_a_method_allocates_even_after_memory_was_freed():
    """Training memory is the growth of the resident set during a run. Memory an earlier run freed
    stays in the C heap (glibc) unless it is handed back, and the next run's growth then read near
    zero: the table said 1 MB for prefix tuning after full fine-tuning had run."""
    import sys

    from softprompt.runs.compare import PeakMemory

    if not sys.platform.startswith("linux"):
        pytest.skip("the resident set is read from /proc")

    def work():  # 400 MB in tensors of 120 KB: heap allocations (below glibc's mmap threshold)
        xs = [torch.ones(30_000) for _ in range(400_000_000 // 120_000)]
        del xs

    work()  # freed, but held by the heap until released
    with PeakMemory("cpu") as mem:
        work()
    assert 350e6 < mem.bytes < 800e6
