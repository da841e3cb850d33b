"""Quality on the int8 base: BLEU on E2E dev MRs (all references, greedy) of one trained prefix,
served on the float32 base and on its int8 view (`--quantize int8`), side by side in one run.

The prefix is prefix tuning (MLP 512, init text, lr 1e-3, the defaults) trained on E2E rows for
--steps steps of 8 rows on the float32 base, or an artifact given with --artifact. The trained
artifact is kept under $SOFTPROMPT_CACHE/bench/ and reused by the next run with the same steps.

    python bench/quality_quantized.py            # 150 steps, 200 dev MRs (~15 min on one busy CPU thread)
    python bench/quality_quantized.py --quick    # 30 steps, 24 dev MRs

Writes bench/results/quality_quantized.json (--quick: quality_quantized_quick.json); the last line
is `bleu_fp32=.. bleu_quantized=.. bleu_delta=..` (float32 minus int8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
E2E = ROOT.parent / "shared" / "data" / "e2e"


def dev_groups(n: int):
    """The first n distinct dev MRs with all their references, as (prompt, [refs])."""
    import csv

    groups: dict[str, list[str]] = {}
    with open(E2E / "devset.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["mr"] not in groups and len(groups) >= n:
                continue
            groups.setdefault(row["mr"], []).append(row["ref"])
    return [(f"{mr} ||", refs) for mr, refs in groups.items()]


def trained_prefix(model, tok, steps: int, seed: int) -> Path:
    """Train (or reuse) the benchmark's prefix on the float32 base; returns the artifact path."""
    from softprompt.models import cache_dir
    from softprompt.runs import run_train

    out = cache_dir() / "bench" / f"quality_quantized_prefix_s{steps}_seed{seed}"
    if (out / "last" / "card.json").is_file():
        print(f"reusing {out / 'last'}", file=sys.stderr)
        return out / "last"
    if out.exists():
        import shutil

        shutil.rmtree(out)  # a run killed half-way
    run_train(str(E2E / "trainset.csv"), str(out), method="prefix_tuning", template="{mr} ||", target="ref",
              steps=steps, batch_size=8, warmup_steps=max(1, steps // 10), checkpoint_every=0, max_rows=4000,
              seed=seed, progress=False, model=model, tokenizer=tok)
    return out / "last"


def score(model, tok, artifact, groups, max_new_tokens: int) -> tuple[dict, float]:
    from softprompt.artifact import load_artifact
    from softprompt.evaluate import evaluate_groups

    kv = load_artifact(artifact, model).to_kv_prefix(model)  # the fingerprint check passes on both bases
    t0 = time.perf_counter()
    res = evaluate_groups(model, tok, groups, kv, max_new_tokens=max_new_tokens, batch_size=16)
    return res, time.perf_counter() - t0


def main():
    import torch

    from softprompt.device import set_threads
    from softprompt.models import load_base

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dev-mrs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--artifact", help="serve this artifact instead of training one")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: the free cores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.dev_mrs, args.steps = 24, 30
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    fp32, tok = load_base(device="cpu")
    artifact = Path(args.artifact) if args.artifact else trained_prefix(fp32, tok, args.steps, args.seed)
    int8, _ = load_base(device="cpu", quantize="int8")  # the `--quantize int8` path: fresh load, then int8
    groups = dev_groups(args.dev_mrs)
    print(f"{len(groups)} dev MRs, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}",
          file=sys.stderr)
    res32, t32 = score(fp32, tok, artifact, groups, args.max_new_tokens)
    print(f"float32: BLEU {res32['bleu']:.2f} ({t32:.0f} s)", file=sys.stderr)
    res8, t8 = score(int8, tok, artifact, groups, args.max_new_tokens)
    print(f"int8:    BLEU {res8['bleu']:.2f} ({t8:.0f} s)", file=sys.stderr)
    same = sum(a == b for a, b in zip(res32["predictions"], res8["predictions"])) / len(groups)
    result = {
        "dev_mrs": len(groups), "train_steps": None if args.artifact else args.steps, "artifact": str(artifact),
        "bleu_fp32": round(res32["bleu"], 2), "bleu_quantized": round(res8["bleu"], 2),
        "bleu_delta": round(res32["bleu"] - res8["bleu"], 2),
        "rouge_l_fp32": round(res32["rouge_l"], 2), "rouge_l_quantized": round(res8["rouge_l"], 2),
        "identical_outputs": round(same, 3), "seconds_fp32": round(t32, 1), "seconds_quantized": round(t8, 1),
        "quantize": "int8: per-channel weights, per-row inputs (two levels but for the widening layers, which are smoothed), shared products (softprompt/quantize.py)",
        "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2), "quick": args.quick,
        "examples": [{"prompt": g[0], "fp32": a, "int8": b} for g, a, b in
                     list(zip(groups, res32["predictions"], res8["predictions"]))[:5]],
    }
    out = ROOT / "bench" / "results" / f"quality_quantized{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"bleu_fp32={result['bleu_fp32']} bleu_quantized={result['bleu_quantized']} bleu_delta={result['bleu_delta']}")


if __name__ == "__main__":
    main()
