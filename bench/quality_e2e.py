"""E2E quality: our prefix tuning and prompt tuning against PEFT prefix tuning (with its MLP) and
PEFT LoRA (r=8), same train rows, batches, steps, schedule and seed; each at the learning rate of
a small sweep that gives the lowest held-out loss; scored on E2E dev MRs with all their
references (BLEU, ROUGE-L), greedy decoding.

Also measures our prefix tuning's two initializations (init=text, the default, and init=random,
both through the MLP) at the same learning rate: the evidence for the default.

    python bench/quality_e2e.py            # 150 steps of 8 rows, one lr each, 200 dev MRs (~40 min, 2 CPU cores)
    python bench/quality_e2e.py --quick    # 20 steps, 1 learning rate, 24 dev MRs
    python bench/quality_e2e.py --steps 600 --dev-mrs 547 --full-sweep   # the full run for a GPU

Writes bench/results/quality_e2e.json and quality_e2e.png (--quick: quality_e2e_quick.*); the last
line is key=value figures.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
E2E = ROOT.parent / "shared" / "data" / "e2e"
P = 20
# PEFT's learning rates come from the sweep in DESIGN.md (prefix + MLP: 1e-3 best; LoRA: 1e-3 best);
# --full-sweep tries two for every method.
# The default run (sized for ~40 min on 2 CPU cores) takes one learning rate per method.
SWEEP = {"prefix": [1e-3], "prompt": [3e-2], "peft_prefix": [1e-3], "lora": [1e-3]}
FULL_SWEEP = {"prefix": [1e-3, 3e-3], "prompt": [3e-2, 1e-1], "peft_prefix": [1e-3, 3e-3], "lora": [1e-3, 3e-3]}
ORDER = ("prefix", "peft_prefix", "lora", "prompt")
QUICK = {"prefix": [1e-3], "prompt": [3e-2], "peft_prefix": [1e-3], "lora": [1e-3]}


def dev_groups(n: int):
    groups: dict[str, list[str]] = {}
    with open(E2E / "devset.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["mr"] not in groups and len(groups) >= n:
                continue
            groups.setdefault(row["mr"], []).append(row["ref"])
    return [(f"{mr} ||", refs) for mr, refs in groups.items()]


def train_rows(tok, n_train: int, n_heldout: int, seed: int):
    from softprompt.loops.data import DataConfig, read_examples, split_heldout, tokenize

    ex = read_examples(E2E / "trainset.csv", DataConfig(template="{mr} ||", target="ref", max_rows=12000))
    random.Random(seed).shuffle(ex)
    train, held = split_heldout(ex, 0.05, seed)  # held-out MRs, for picking the learning rate
    cfg = DataConfig(max_length=256, skip_bad_rows=True)
    from softprompt.loops.data import BadRows

    return tokenize(train[:n_train], tok, cfg, BadRows()), tokenize(held[:n_heldout], tok, cfg, BadRows())


class PeftPrompt:
    """A PEFT model behind our `prompt(model, ids, mask, **kw)` protocol, for our loop."""

    def __init__(self, pm):
        self.pm = pm

    def __call__(self, model, input_ids, attention_mask, **kw):
        return self.pm(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def parameters(self):
        return self.pm.parameters()

    def train(self):
        pass

    def eval(self):
        pass


def run_one(name, lr, init, model, tok, train, held, steps, batch, seed, device="cpu"):
    """Train one configuration; returns (held-out loss, a function that makes predictions, seconds)."""
    import torch

    from softprompt import methods
    from softprompt.loops.evaluate import predict
    from softprompt.loops.train import TrainConfig, Trainer, eval_loss

    cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=max(1, steps // 10), seed=seed)
    torch.manual_seed(seed)
    if name in ("prefix", "prompt"):
        method = {"prefix": "prefix_tuning", "prompt": "prompt_tuning"}[name]
        opts = {"prefix": dict(projection_dim=512), "prompt": {}}[name]
        if init == "text":
            from softprompt.core.defaults import INIT_TEXT as DEFAULT_INIT_TEXT

            opts |= dict(init="text", init_text=DEFAULT_INIT_TEXT)
        else:
            opts |= dict(init="random")
        prompt = methods.create(method, model, tok, num_virtual_tokens=P, seed=seed, **opts)
        base = model
    else:
        from peft import LoraConfig, PrefixTuningConfig, get_peft_model

        from softprompt.io.load import load_base

        base, _ = load_base(device=device)  # PEFT wraps (LoRA: modifies) the model: give it its own copy
        pc = (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                 encoder_hidden_size=512) if name == "peft_prefix"
              else LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0))
        pm = get_peft_model(base, pc)
        prompt = PeftPrompt(pm)
    t0 = time.perf_counter()
    tr = Trainer(base, tok, prompt, train, cfg)  # the same loop, batches and loss for every method
    while tr.step < steps:
        row = tr.train_step()
        if tr.step % 10 == 0 or tr.step == steps:
            print(f"    {name} lr={lr:g} init={init} step {tr.step}: loss {row['loss']:.3f}", file=sys.stderr,
                  flush=True)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        held_loss = eval_loss(prompt, base, held, 16, tok.pad_token_id)

    def outputs(prompts):
        if isinstance(prompt, PeftPrompt):
            if name == "lora":
                merged = prompt.pm.merge_and_unload()
                return predict(merged, tok, prompts, None, max_new_tokens=64, batch_size=16)
            from softprompt.io.artifact import load_artifact

            with tempfile.TemporaryDirectory() as d:
                prompt.pm.save_pretrained(d)
                kv = load_artifact(d, model).to_kv_prefix(model)
            return predict(model, tok, prompts, kv, max_new_tokens=64, batch_size=16)
        return predict(model, tok, prompts, prompt.to_kv_prefix(model), max_new_tokens=64, batch_size=16)

    return held_loss, outputs, seconds


LABELS = {"prefix": "ours prefix (MLP, init text)", "prefix_random": "ours prefix (MLP, init random)",
          "prompt": "ours prompt tuning", "peft_prefix": "PEFT prefix (MLP)", "lora": "PEFT LoRA r=8"}


def chart(results: dict, path: Path) -> None:
    """BLEU and ROUGE-L bars of each method's best run (needs matplotlib; skipped without it)."""
    labels = LABELS
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in labels if k in results["best"]]
        fig, ax = plt.subplots(figsize=(8, 4))
        x = range(len(keys))
        ax.bar([i - 0.2 for i in x], [results["best"][k]["bleu"] for k in keys], 0.4, label="BLEU")
        ax.bar([i + 0.2 for i in x], [results["best"][k]["rouge_l"] for k in keys], 0.4, label="ROUGE-L")
        ax.set_xticks(list(x), [labels[k] for k in keys], rotation=15, fontsize=8)
        ax.set_title(f"E2E dev ({results['dev_mrs']} MRs), {results['steps']} steps x {results['batch_size']} rows, "
                     "SmolLM2-135M")
        ax.set_ylim(0, 80)
        ax.legend(loc="upper right", ncols=2)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except ImportError:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dev-mrs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--full-sweep", action="store_true", help="two learning rates for every method")
    a = ap.parse_args()
    steps = a.steps or (20 if a.quick else 150)
    n_dev = a.dev_mrs or (24 if a.quick else 200)
    sweep = QUICK if a.quick else FULL_SWEEP if a.full_sweep else SWEEP
    import torch

    torch.set_num_threads(a.threads)
    from record import Record

    from softprompt.io.load import load_base
    from softprompt.loops.evaluate import score

    rec = Record("quality_e2e", quick=a.quick)

    t_start = time.time()
    model, tok = load_base(device=a.device)
    train, held = train_rows(tok, steps * a.batch_size, 64, a.seed)
    groups = dev_groups(n_dev)
    prompts, refs = [p for p, _ in groups], [r for _, r in groups]
    results = {"steps": steps, "batch_size": a.batch_size, "num_virtual_tokens": P, "train_rows": len(train),
               "dev_mrs": len(groups), "dev_references": sum(map(len, refs)), "seed": a.seed, "runs": [],
               "best": {}}
    configs = [(n, lr, "text" if n in ("prefix", "prompt") else "-") for n in ORDER for lr in sweep[n]]
    configs.append(("prefix", sweep["prefix"][0], "random"))  # the init comparison
    for name, lr, init in configs:  # train, then score at once: a cut-short run still reports
        held_loss, outputs, secs = run_one(name, lr, init, model, tok, train, held, steps, a.batch_size, a.seed,
                                           a.device)
        run = {"method": name, "lr": lr, "init": init, "heldout_loss": held_loss, "train_seconds": secs}
        key = name if init in ("text", "-") else f"{name}_{init}"
        if key not in results["best"] or held_loss < results["best"][key]["heldout_loss"]:
            t0 = time.perf_counter()
            hyps = outputs(prompts)
            s = score(hyps, refs)
            run.update(bleu=s["bleu"], rouge_l=s["rouge_l"], eval_seconds=time.perf_counter() - t0,
                       samples=[{"mr": p, "output": h} for p, h in list(zip(prompts, hyps))[:3]])
            results["best"][key] = run
        results["runs"].append(run)
        print(f"  {key:<14} lr={lr:<7g} held-out loss {held_loss:.4f} BLEU {run.get('bleu', float('nan')):.2f} "
              f"ROUGE-L {run.get('rouge_l', float('nan')):.2f} ({secs:.0f} s training)", file=sys.stderr, flush=True)
        results["minutes"] = (time.time() - t_start) / 60
        rec.save(results, headline={})  # a run cut short still leaves what it measured
    results["minutes"] = (time.time() - t_start) / 60
    b = results["best"]
    rec.save(results, headline={f"bleu_{k}": round(r["bleu"], 2) for k, r in b.items()},
             threads=a.threads if a.device == "cpu" else a.device)
    labels = LABELS
    chart(results, rec.path.with_suffix(".png"))
    print(f"\n{'method':<34}{'lr':>8}{'held-out loss':>15}{'BLEU':>8}{'ROUGE-L':>9}")
    for k in labels:
        if k in results["best"]:
            r = results["best"][k]
            print(f"{labels[k]:<34}{r['lr']:>8g}{r['heldout_loss']:>15.4f}{r['bleu']:>8.2f}{r['rouge_l']:>9.2f}")
    print(f"bleu_prefix={b['prefix']['bleu']:.2f} bleu_prompt={b['prompt']['bleu']:.2f} "
          f"bleu_peft_prefix={b['peft_prefix']['bleu']:.2f} bleu_lora={b['lora']['bleu']:.2f} "
          f"bleu_prefix_random_init={b['prefix_random']['bleu']:.2f} steps={steps} dev_mrs={len(groups)} "
          f"minutes={results['minutes']:.1f}")


if __name__ == "__main__":
    main()
