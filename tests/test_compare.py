"""`softprompt compare` on a tiny llama: every method trained on the same data, a row each."""

import json

from conftest import tiny_model
from tiny_tokenizer import tiny_tokenizer

from softprompt.compare import run_compare


def test_compare_tiny(tmp_path):
    data = tmp_path / "d.jsonl"
    words = ["ba be", "bi bo", "bu ca", "ce ci", "co cu"]
    data.write_text("".join(json.dumps({"input": w, "output": "da de"}) + "\n" for w in words * 2))
    rep = run_compare(str(data), str(tmp_path / "cmp"), steps=2, batch_size=2, num_virtual_tokens=2, lora_r=2,
                      max_new_tokens=2, tasks=2, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    assert [r["method"] for r in rep["rows"]] == ["prefix_tuning", "prompt_tuning", "lora"]
    for r in rep["rows"]:
        assert r["trainable_parameters"] > 0 and r["artifact_bytes"] > 0 and r["eval_loss"] > 0
        assert r["tokens_per_s_1_task"] > 0 and r["tokens_per_s_mixed"] > 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.count("\n| ") == 3 and "tok/s 2 tasks mixed" in md
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
