"""Data parallel: `torchrun --nproc-per-node 2 -m softprompt.cli train ...` (gloo, CPU) gives the same
result as one process with the same global batch, within 1e-5."""

import json
import os
import subprocess
import sys

import torch

from conftest import tiny_model
from softprompt.artifact import load_artifact
from tiny_tokenizer import WORDS, tiny_tokenizer


def test_two_processes_equal_one(tmp_path):
    base = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    rows = [json.dumps({"input": " ".join(WORDS[(i * k) % 70] for k in range(1, 4 + i % 5)),
                        "output": " ".join(WORDS[(i + 3 * k) % 90] for k in range(1 + i % 4))}) for i in range(32)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows))
    args = [str(data), None, "--base", str(base), "--method", "prefix_tuning", "--projection-dim", "8",
            "--num-virtual-tokens", "2", "--steps", "4", "--batch-size", "8", "--lr", "0.01",
            "--checkpoint-every", "0", "--no-progress"]
    two = list(args)
    two[1] = str(tmp_path / "two")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "softprompt.cli", "train", *two], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from softprompt.models import load_base
    from softprompt.runs import run_train

    model, tok = load_base(base)
    run_train(str(data), str(tmp_path / "one"), method="prefix_tuning", projection_dim=8, num_virtual_tokens=2,
              steps=4, batch_size=8, lr=0.01, checkpoint_every=0, progress=False, model=model, tokenizer=tok)
    losses = {d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")}
    assert len(losses["two"]) == 4
    assert max(abs(a - b) for a, b in zip(losses["one"], losses["two"])) < 1e-5
    a = load_artifact(tmp_path / "one" / "last", model).export_tensors()["prefix"]
    b = load_artifact(tmp_path / "two" / "last", model).export_tensors()["prefix"]
    assert not torch.equal(a, load_artifact(tmp_path / "two" / "best", model).export_tensors()["prefix"] * 0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
