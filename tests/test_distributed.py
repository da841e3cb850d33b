"""Data parallel: `torchrun --nproc-per-node 2 -m softprompt.cli train ...` (gloo, CPU) splits each global
batch between the processes (disjoint halves, together the batch one process takes), each process's
gradient is that of its own half, the all-reduced gradient is the one process's full-batch gradient,
and 4 steps give the same losses and prefix as one process within 1e-5."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer

from softprompt.io.artifact import load_artifact

# Run under torchrun: the CLI's own `train`, with the loop watched (test code, no hook in the library):
# the rows each loss call sees per step, and at step 1 the prompt before the update, the gradient
# before the all-reduce (this process's half) and after it (what the optimizer uses).
WATCH = r'''
import os, sys, torch
import softprompt.loops.train as T
from softprompt.cli import main

rec = {"rows": [], "pre": None, "post": None, "init": None}
loss = T.CausalLMObjective.loss
def watched_loss(self, prompt, model, data, rows, pad_id, device):
    if torch.is_grad_enabled():
        rec["rows"][-1].extend(rows)
    return loss(self, prompt, model, data, rows, pad_id, device)
T.CausalLMObjective.loss = watched_loss
step = T.Trainer.train_step
def watched_step(self):
    if rec["init"] is None:
        rec["init"] = {k: v.detach().clone() for k, v in self.prompt.state_dict().items()}
    rec["rows"].append([])
    return step(self)
T.Trainer.train_step = watched_step
reduce = T._all_reduce_
def watched_reduce(tensors):
    if rec["pre"] is None:
        rec["pre"] = [t.clone() for t in tensors[:-1]]  # the last one is the loss sum
    reduce(tensors)
    if rec["post"] is None:
        rec["post"] = [t.clone() for t in tensors[:-1]]
T._all_reduce_ = watched_reduce
rc = main(sys.argv[2:])
torch.save(rec, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
sys.exit(rc)
'''


def test_two_processes_split_the_batch_and_equal_one(tmp_path, monkeypatch):
    base = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    rows = [json.dumps({"input": " ".join(WORDS[(i * k) % 70] for k in range(1, 4 + i % 5)),
                        "output": " ".join(WORDS[(i + 3 * k) % 90] for k in range(1 + i % 4))}) for i in range(32)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows))
    args = [str(data), str(tmp_path / "two"), "--base", str(base), "--method", "prefix_tuning", "--projection-dim",
            "8", "--num-virtual-tokens", "2", "--steps", "4", "--batch-size", "8", "--lr", "0.01",
            "--checkpoint-every", "0", "--no-progress"]
    (tmp_path / "watch.py").write_text(WATCH)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(tmp_path / "watch.py"), str(tmp_path), "train", *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    # The same run in one process, watched the same way.
    import softprompt.loops.train as T
    from softprompt.io.load import load_base
    from softprompt.runs.config import RunConfig
    from softprompt.runs.train import run_train

    seen, grads = [], []
    loss = T.CausalLMObjective.loss

    def watched_loss(self, prompt, model, data, rows, pad_id, device):
        if torch.is_grad_enabled():
            seen.append(list(rows))
        return loss(self, prompt, model, data, rows, pad_id, device)

    clip = torch.nn.utils.clip_grad_norm_

    def watched_clip(params, *a, **k):
        params = list(params)
        grads.append([p.grad.clone() for p in params])
        return clip(params, *a, **k)

    monkeypatch.setattr(T.CausalLMObjective, "loss", watched_loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", watched_clip)
    model, tok = load_base(base)
    run_train(RunConfig.of(train_data=str(data), out=str(tmp_path / "one"), method="prefix_tuning", projection_dim=8,
                           num_virtual_tokens=2, steps=4, batch_size=8, lr=0.01, checkpoint_every=0, progress=False),
              model, tok)
    monkeypatch.undo()

    # Each step: the two processes take disjoint halves of 4 rows, together the 8 rows one process takes.
    assert len(seen) == 4 and [len(r["rows"]) for r in ranks] == [4, 4]
    for s in range(4):
        a, b = ranks[0]["rows"][s], ranks[1]["rows"][s]
        assert len(a) == len(b) == 4 and not set(a) & set(b), (s, a, b)
        assert sorted(a + b) == sorted(seen[s])

    # Step 1's gradient: each process's own is that of its half alone (recomputed here from the same
    # starting prompt, normalized by the global batch's target tokens); the all-reduced one is their
    # sum, and equals the one process's full-batch gradient.
    from softprompt import methods
    from softprompt.loops.data import DataConfig, read_examples, tokenize

    assert all(torch.equal(ranks[0]["init"][k], ranks[1]["init"][k]) for k in ranks[0]["init"])
    prompt = methods.create("prefix_tuning", model, tok, num_virtual_tokens=2, projection_dim=8, seed=0)
    prompt.load_state_dict(ranks[0]["init"])
    prompt.train()
    td = tokenize(read_examples(str(data), DataConfig()), tok, DataConfig())
    n_global = sum(td.n_target[i] for i in seen[0])
    params = [p for p in prompt.parameters() if p.requires_grad]
    for r in ranks:
        prompt.zero_grad()
        shard_loss, _ = T.CausalLMObjective().loss(prompt, model, td, r["rows"][0], tok.pad_token_id, "cpu")
        (shard_loss / n_global).backward()
        for p, g in zip(params, r["pre"]):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-6)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731 (the text init zeroes some grads)
    pre0, pre1, post0, post1, full = (flat(ranks[0]["pre"]), flat(ranks[1]["pre"]), flat(ranks[0]["post"]),
                                      flat(ranks[1]["post"]), flat(grads[0]))
    assert full.abs().max() > 1e-3
    assert (pre0 - full).abs().max() > 1e-4 and (pre1 - full).abs().max() > 1e-4  # a half is not the batch
    torch.testing.assert_close(post0, pre0 + pre1, rtol=0, atol=1e-7)
    torch.testing.assert_close(post1, post0, rtol=0, atol=0)
    torch.testing.assert_close(post0, full, rtol=0, atol=1e-6)

    # 4 steps: the same losses and the same trained prefix as one process, which moved from its start.
    losses = {d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")}
    assert len(losses["two"]) == 4
    assert max(abs(a - b) for a, b in zip(losses["one"], losses["two"])) < 1e-5
    a = load_artifact(tmp_path / "one" / "last", model).export_tensors()["prefix"]
    b = load_artifact(tmp_path / "two" / "last", model).export_tensors()["prefix"]
    with torch.no_grad():
        start = prompt.to_kv_prefix(model)
    assert (a - start).abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
