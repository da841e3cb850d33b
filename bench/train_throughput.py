"""Training throughput and memory: our loop against PEFT on the embedded model, E2E rows.

Same method, P, global batch, steps, learning rate and rows for both. Each side gets the batches
it would get by default: PEFT the usual shuffled batches padded to the longest row, with the LM
head over every position; ours length-grouped batches with the LM head at target positions only.
A third column, "ours, PEFT's batches", runs our loop on exactly PEFT's batches to separate the
two effects and to compare the loss curves step by step.

Throughput: the trainers take steps in turn (round robin) in one process, so machine noise hits
all of them alike; we report target tokens per second of training time. Memory: each
configuration runs again in a fresh subprocess for a few steps while a thread samples its RSS;
peak RSS during training minus RSS before the first step (activations, logits, gradients,
optimizer state).
`memory_vs_peft` compares the two loops on the same batches (a peak follows the longest batch).

    python bench/train_throughput.py [--quick] [--steps 20] [--batch-size 8]

Writes bench/results/train_throughput.json (--quick: train_throughput_quick.json); the last line is
key=value figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
E2E = ROOT.parent / "shared" / "data" / "e2e" / "trainset.csv"
P, LR = 20, {"prefix_tuning": 1e-3, "prompt_tuning": 3e-2}


def load_rows(n: int, seed: int):
    from softprompt.loops.data import DataConfig, read_examples

    ex = read_examples(E2E, DataConfig(template="{mr} ||", target="ref", max_rows=4000))
    random.Random(seed).shuffle(ex)
    return ex[:n]


def make_side(kind: str, method: str, model, tok, data, steps: int, batch: int, seed: int):
    """A callable doing one optimizer step and returning (loss, target tokens)."""
    import torch

    from softprompt import methods
    from softprompt.loops.data import collate
    from softprompt.loops.train import TrainConfig, Trainer

    rng = random.Random(seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    peft_batches = [order[(i * batch) % len(order):][:batch] for i in range(steps)]
    if kind == "peft":
        from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

        torch.manual_seed(seed)
        cfg = (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                  encoder_hidden_size=512) if method == "prefix_tuning"
               else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        pm = get_peft_model(model, cfg)
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR[method])
        state = {"i": 0}

        def step():
            idx = peft_batches[state["i"]]
            state["i"] += 1
            ids, mask, tmask = collate([data.ids[i] for i in idx], [data.n_target[i] for i in idx], tok.pad_token_id)
            labels = ids.masked_fill(~tmask, -100)
            opt.zero_grad()
            out = pm(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return float(out.loss), int(tmask.sum())

        return step, (lambda: pm.base_model.__class__)  # keep pm alive
    init = {"prefix_tuning": dict(projection_dim=512, init="random"), "prompt_tuning": dict(init="random")}[method]
    prompt = methods.create(method, model, tok, num_virtual_tokens=P, seed=seed, **init)
    tr = Trainer(model, tok, prompt, data, TrainConfig(steps=steps, batch_size=batch, lr=LR[method],
                                                       schedule="constant", seed=seed))
    if kind == "ours_same_batches":
        tr.global_batch = lambda s: peft_batches[s]

    def step():
        row = tr.train_step()
        return row["loss"], row["target_tokens"]

    return step, prompt


def throughput(method, model, tok, data, steps, batch, seed):
    sides = {k: make_side(k, method, model, tok, data, steps, batch, seed)[0]
             for k in ("peft", "ours", "ours_same_batches")}
    t = {k: 0.0 for k in sides}
    toks = {k: 0 for k in sides}
    losses = {k: [] for k in sides}
    for s in range(steps):
        for k, fn in sides.items():
            t0 = time.perf_counter()
            loss, n = fn()
            dt = time.perf_counter() - t0
            if s > 0:  # the first step warms up kernels
                t[k] += dt
                toks[k] += n
            losses[k].append(loss)
        print(f"  {method} step {s + 1}/{steps}: " + "  ".join(f"{k} {losses[k][-1]:.3f}" for k in sides),
              file=sys.stderr, flush=True)
    return {k: {"target_tokens_per_s": toks[k] / t[k], "losses": losses[k]} for k in sides}


def _memory_child(kind, method, steps, batch, seed, n_rows):
    import torch

    torch.set_num_threads(2)
    from softprompt.io.load import load_base
    from softprompt.loops.data import DataConfig, tokenize

    model, tok = load_base()
    data = tokenize(load_rows(n_rows, seed), tok, DataConfig(max_length=256, skip_bad_rows=True))
    fn, _keep = make_side(kind, method, model, tok, data, steps, batch, seed)
    base = _rss()  # before the first step: activations, logits, gradients and optimizer state all count
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for _ in range(steps):
        fn()
    stop.set()
    th.join()
    print(json.dumps({"peak_delta_mb": (peak[0] - base) / 2**20}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(kind, method, batch, seed, n_rows, steps=4):
    out = subprocess.run([sys.executable, __file__, "--memory-child", kind, method, "--batch-size", str(batch),
                          "--seed", str(seed), "--rows", str(n_rows), "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mb"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 steps instead of 20")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    steps = a.steps or (6 if a.quick else 20)
    if a.memory_child:
        return _memory_child(*a.memory_child, steps, a.batch_size, a.seed, a.rows)
    import torch

    torch.set_num_threads(2)
    from record import Record

    from softprompt.io.load import load_base
    from softprompt.loops.data import DataConfig, tokenize

    rec = Record("train_throughput", quick=a.quick)
    model, tok = load_base()
    data = tokenize(load_rows(a.rows, a.seed), tok, DataConfig(max_length=256, skip_bad_rows=True))
    results = {"steps": steps, "batch_size": a.batch_size, "num_virtual_tokens": P, "rows": len(data),
               "lr": LR, "torch_threads": torch.get_num_threads(), "device": "cpu", "methods": {}}
    t_start = time.time()
    for method in ("prefix_tuning", "prompt_tuning"):
        r = throughput(method, model, tok, data, steps, a.batch_size, a.seed)
        for kind in r:
            r[kind]["peak_memory_mb"] = memory(kind, method, a.batch_size, a.seed, a.rows)
        k = max(1, steps // 4)
        for kind in r:
            r[kind]["mean_loss_last"] = sum(r[kind]["losses"][-k:]) / k
        r["speedup_vs_peft"] = r["ours"]["target_tokens_per_s"] / r["peft"]["target_tokens_per_s"]
        r["speedup_same_batches"] = r["ours_same_batches"]["target_tokens_per_s"] / r["peft"]["target_tokens_per_s"]
        # peak memory follows the longest batch seen, so compare it on the same batches
        r["memory_vs_peft"] = r["ours_same_batches"]["peak_memory_mb"] / r["peft"]["peak_memory_mb"]
        results["methods"][method] = r
    results["seconds"] = time.time() - t_start
    pre, pro = results["methods"]["prefix_tuning"], results["methods"]["prompt_tuning"]
    rec.save(results, headline={"speedup_vs_peft": round(pre["speedup_vs_peft"], 2),
                                "memory_vs_peft": round(pre["memory_vs_peft"], 2),
                                "speedup_same_batches": round(pre["speedup_same_batches"], 2),
                                "prompt_speedup_vs_peft": round(pro["speedup_vs_peft"], 2),
                                "prompt_memory_vs_peft": round(pro["memory_vs_peft"], 2)})
    print(f"\n{'method':<15}{'side':<20}{'target tok/s':>14}{'peak MB':>10}{'loss (last)':>13}")
    for m, r in results["methods"].items():
        for kind in ("peft", "ours", "ours_same_batches"):
            s = r[kind]
            print(f"{m:<15}{kind:<20}{s['target_tokens_per_s']:>14.1f}{s['peak_memory_mb']:>10.0f}"
                  f"{s['mean_loss_last']:>13.3f}")
    print(f"speedup_vs_peft={pre['speedup_vs_peft']:.2f} memory_vs_peft={pre['memory_vs_peft']:.2f} "
          f"speedup_same_batches={pre['speedup_same_batches']:.2f} "
          f"prompt_speedup_vs_peft={pro['speedup_vs_peft']:.2f} prompt_memory_vs_peft={pro['memory_vs_peft']:.2f} "
          f"steps={steps} batch={a.batch_size}")


if __name__ == "__main__":
    main()
