"""bench/distill.py (issue 29 item 5): its long prompts are built as softprompt/assets/prompts/README.md
says, from ../shared/data at run time, and its whole path (distill three prompts, serve compiled
against distilled tasks, time to first token) runs in-process on a tiny random base in seconds,
writing a quick result whose figures follow from its own numbers. A tiny random model's scores mean
nothing; what is checked is that every figure is there and computed as the docstring says."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
DATA = BENCH.parents[1] / "shared" / "data"
TINY = ["--inputs", "6", "--steps", "2", "--tasks", "4", "--requests", "8", "--new-tokens", "3", "--rounds", "1",
        "--ttft-requests", "3", "--threads", "1", "--quiet"]

pytestmark = pytest.mark.skipif(not (DATA / "e2e").is_dir() or not (DATA / "sst2").is_dir(),
                                reason="needs ../shared/data (E2E and SST-2)")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_distill", BENCH / "distill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def long_base(tmp_path_factory):
    """conftest's tiny Llama, with room for the bench's prompts (up to ~650 word-level tokens)."""
    from conftest import VOCAB
    from tiny_tokenizer import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("long_base")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _run(bench, argv, monkeypatch, capsys):
    """main(argv) in this process: (exit status, the last line's figures, the saved result)."""
    monkeypatch.setattr(sys, "argv", ["bench/distill.py", *argv])
    threads = torch.get_num_threads()
    try:
        status = bench.main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads 1 must not outlive the run
    last = capsys.readouterr().out.strip().splitlines()[-1]
    results = Path(argv[argv.index("--results") + 1])
    assert not (results / "distill.json").exists()  # another base, tiny sizes: never the full result
    saved = json.loads((results / "distill_quick.json").read_text())
    return status, dict(kv.split("=", 1) for kv in last.split()), saved


def _tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# The prompts


def test_the_prompts_are_built_as_the_readme_says(bench):
    e2e, sst2, weather = (bench.build_prompt(n, 30) for n in ("e2e", "sst2", "weather"))
    spec = json.loads((BENCH.parent / "softprompt" / "assets" / "prompts" / "e2e.json").read_text())
    assert e2e.text.startswith(spec["instruction"]) and e2e.text.endswith("\n")
    shots = e2e.text[len(spec["instruction"]):].splitlines()
    train = {(mr, ref) for mr, ref in bench._e2e_rows(DATA / "e2e" / "trainset.csv")}
    assert len(shots) == 10 and all(tuple(s.split(" || ", 1)) in train for s in shots)
    assert len({s.split(" || ")[0] for s in shots}) == 10  # ten distinct MRs
    dev = bench._grouped(bench._e2e_rows(DATA / "e2e" / "devset.csv"))
    assert len(e2e.inputs) == 30 and all(refs == dev[mr] for mr, refs in e2e.inputs)  # every reference of each MR
    assert e2e.request(e2e.inputs[0][0]) == e2e.inputs[0][0] + " ||" and e2e.max_new_tokens == 64

    lines = sst2.text.splitlines()
    reviews, labels = lines[2::2], [ln.removeprefix("Sentiment: ") for ln in lines[3::2]]
    assert len(reviews) == 16 and all(r.startswith("Review: ") for r in reviews)
    assert labels == ["negative", "positive"] * 8  # 8 per label, interleaved, as label words
    train = {s: y for s, y in bench._sst2_rows(DATA / "sst2" / "train.tsv")}
    assert all({"0": "negative", "1": "positive"}[train[r.removeprefix("Review: ")]] == y
               for r, y in zip(reviews, labels))
    assert all(refs in (["negative"], ["positive"]) for _, refs in sst2.inputs)
    assert sst2.request("a fine film") == "Review: a fine film\nSentiment:" and sst2.max_new_tokens == 2

    assert weather.text == (BENCH.parent / "softprompt" / "assets" / "prompts" / "weather.txt").read_text()
    assert all(f"Record: {x}\n" not in weather.text for x, _ in weather.inputs)  # never one of its own examples
    assert all(len(refs) == 1 and refs[0].startswith(x.split(" |")[0].removeprefix("city: ") + ":")
               for x, refs in weather.inputs)

    # the shots are fixed by the prompt's JSON; the seed only draws other inputs
    again = bench.build_prompt("e2e", 30, seed=1)
    assert again.text == e2e.text and again.inputs != e2e.inputs and bench.build_prompt("e2e", 30).inputs == e2e.inputs
    with pytest.raises(ValueError, match="unknown prompt"):
        bench.build_prompt("haiku", 3)


def test_the_headline_takes_the_worst_prompt_and_skips_an_undefined_agreement(bench):
    assert bench.agreement(45.0, 50.0) == 0.9 and bench.agreement(3.0, 0.0) is None
    per_prompt = {"weather": {"agreement": 0.97, "compression": 39.7, "seconds": {"total": 300}},
                  "e2e": {"agreement": None, "compression": 41.2, "seconds": {"total": 600}},
                  "sst2": {"agreement": 0.9, "compression": 27.5, "seconds": {"total": 120}}}
    line = bench.headline(per_prompt, {"serve_speedup": 1.4, "seconds_compiled": 9.0}, {"ttft_speedup": 6.1})
    assert line == {"agreement_min": 0.9, "compression_min": 27.5, "serve_speedup": 1.4, "ttft_speedup": 6.1,
                    "agreement_weather": 0.97, "agreement_e2e": None, "agreement_sst2": 0.9,
                    "distill_minutes_max": 10.0}


# --------------------------------------------------------------------------------------------
# The whole bench on a tiny base


def test_the_bench_runs_end_to_end_on_a_tiny_base(bench, long_base, tmp_path, monkeypatch, capsys):
    from tiny_tokenizer import tiny_tokenizer

    status, figures, saved = _run(bench, ["--base", str(long_base), *TINY, "--results", str(tmp_path)], monkeypatch,
                                  capsys)
    assert status == 0 and "errors" not in saved
    assert saved["run"]["command"].startswith(f"python bench/distill.py --base {long_base}")
    assert {k: str(v) for k, v in saved["headline"].items()} == figures
    keys = [k for k in bench.KEYS if k in figures]
    assert list(figures) == keys and keys[-1] == "minutes"
    assert {"compression_min", "serve_speedup", "ttft_speedup", "ttft_written_ms", "ttft_distilled_ms"} <= set(figures)

    tok, P = tiny_tokenizer(), 16
    prompts = {n: bench.build_prompt(n, 6) for n in bench.PROMPTS}
    for name, f in saved["prompts"].items():
        p = prompts[name]
        assert f["prompt_tokens"] == _tokens(tok, p.text) and f["num_virtual_tokens"] == P
        assert f["compression"] == round(f["prompt_tokens"] / P, 2) and f["steps"] == 2
        assert f["inputs"]["train"] + f["inputs"]["heldout"] == 6 and f["inputs"]["heldout"] >= 1
        m = bench.METRIC[name]
        want = round(f["student"][m] / f["teacher"][m], 3) if f["teacher"][m] > 0 else None
        assert f["agreement"] == want  # student / teacher on the held-out labels
    assert list(saved["prompts"]) == list(bench.PROMPTS)
    assert saved["compression_min"] == min(f["compression"] for f in saved["prompts"].values())
    defined = [f["agreement"] for f in saved["prompts"].values() if f["agreement"] is not None]
    assert saved.get("agreement_min") == (min(defined) if defined else None)

    serve = saved["serve"]
    assert serve["distilled_from"] == {n: "student" for n in bench.PROMPTS}
    assert serve["serve_speedup"] > 0 and serve["tokens_per_s_compiled"] > 0
    # task i is prompt i mod 3 with its own first line: its cache is that many positions; a distilled one P
    per_position = saved["prompts"]["weather"]["cache_bytes"]["student"] // P
    order = list(prompts.values())
    assert serve["cache_bytes_compiled"] == per_position * sum(_tokens(tok, bench.task_text(order[i % 3], i, 4))
                                                               for i in range(4))
    assert serve["cache_bytes_distilled"] == 4 * P * per_position
    ttft = saved["ttft"]
    assert ttft["ttft_speedup"] == round(ttft["ttft_written_ms"] / ttft["ttft_distilled_ms"], 2)
    # the compiled prefix is exact, so its first token is the written-out prompt's (no near-ties to break on
    # a random model: its logits' gaps are far above float32 round-off)
    assert ttft["first_token_written_equals_compiled"] == 1.0


def test_a_failed_prompt_loses_only_its_own_figures(bench, long_base, tmp_path, monkeypatch, capsys):
    """Its section fails; the other prompt's figures survive; its served prefixes come from the
    compiled prompt's first P positions (the student's start) and the run says so."""
    argv = ["--base", str(long_base), *TINY, "--prompts", "weather,sst2", "--fail-section", "weather",
            "--results", str(tmp_path)]
    status, figures, saved = _run(bench, argv, monkeypatch, capsys)
    assert status == 1 and figures.pop("failed") == "weather"
    assert list(saved["prompts"]) == ["sst2"]
    assert saved["errors"] == {"weather": "SectionFailed: --fail-section weather"}
    assert saved["compression_min"] == saved["prompts"]["sst2"]["compression"]
    assert saved["serve"]["distilled_from"] == {"weather": "prompt_init", "sst2": "student"}
    assert {"serve_speedup", "ttft_speedup"} <= set(figures)
