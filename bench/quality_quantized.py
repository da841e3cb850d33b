"""Quality on the int8 base: BLEU on E2E dev MRs (all references, greedy) of one trained prefix,
served on the float32 base and on its int8 view (`--quantize int8`), side by side in one run.

The prefix is prefix tuning (MLP 512, init text, lr 1e-3, the defaults) trained on E2E rows for
--steps steps of 8 rows on the float32 base, or an artifact given with --artifact. The trained
artifact is kept under $SOFTPROMPT_CACHE/bench/ and reused by the next run with the same steps.

Each ISA is scored in a child process of its own, started with that ISA's environment
(`softprompt.core.device.ISA_CAPS`): the int8 arithmetic differs by CPU (7-bit inputs where int8 sums
would saturate, softprompt/core/int8_kernels.py), and so may its quality.

    python bench/quality_quantized.py                 # native and avx2: 150 steps, 200 dev MRs (~10 min to train once, ~3 min per ISA, one thread)
    python bench/quality_quantized.py --quick         # 30 steps, 24 dev MRs
    python bench/quality_quantized.py --isa native    # one ISA

Writes bench/results/quality_quantized.json (--quick: quality_quantized_quick.json); the last line
is `bleu_delta_native=.. bleu_delta_avx2=.. bleu_fp32_native=.. ...` (delta: float32 minus int8).
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
    from softprompt.io.load import cache_dir
    from softprompt.runs.train import run_train

    out = cache_dir() / "bench" / f"quality_quantized_prefix_s{steps}_seed{seed}"
    if (out / "last" / "card.json").is_file():
        print(f"reusing {out / 'last'}", file=sys.stderr)
        return out / "last"
    if out.exists():
        import shutil

        shutil.rmtree(out)  # a run killed half-way
    from softprompt.runs.config import RunConfig

    run_train(RunConfig.of(train_data=str(E2E / "trainset.csv"), out=str(out), method="prefix_tuning",
                           template="{mr} ||", target="ref", steps=steps, batch_size=8,
                           warmup_steps=max(1, steps // 10), checkpoint_every=0, max_rows=4000, seed=seed,
                           progress=False), model, tok)
    return out / "last"


def score(model, tok, artifact, groups, max_new_tokens: int) -> tuple[dict, float]:
    from softprompt.io.artifact import load_artifact
    from softprompt.loops.evaluate import evaluate_groups

    kv = load_artifact(artifact, model).to_kv_prefix(model)  # the fingerprint check passes on both bases
    t0 = time.perf_counter()
    res = evaluate_groups(model, tok, groups, kv, max_new_tokens=max_new_tokens, batch_size=16)
    return res, time.perf_counter() - t0


def child(args) -> None:
    """One ISA's scores (this process was started with its environment), printed as JSON."""
    import torch

    from softprompt.core.device import set_threads
    from softprompt.core.int8_kernels import describe
    from softprompt.io.load import load_base

    set_threads(args.threads)
    torch.manual_seed(args.seed)
    fp32, tok = load_base(device="cpu")
    artifact = Path(args.artifact)
    int8, _ = load_base(device="cpu", quantize="int8")  # the `--quantize int8` path: fresh load, then int8
    groups = dev_groups(args.dev_mrs)
    print(f"[{args.child}] {len(groups)} dev MRs, {torch.get_num_threads()} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}; {describe()}", file=sys.stderr)
    res32, t32 = score(fp32, tok, artifact, groups, args.max_new_tokens)
    print(f"[{args.child}] float32: BLEU {res32['bleu']:.2f} ({t32:.0f} s)", file=sys.stderr)
    res8, t8 = score(int8, tok, artifact, groups, args.max_new_tokens)
    print(f"[{args.child}] int8:    BLEU {res8['bleu']:.2f} ({t8:.0f} s)", file=sys.stderr)
    same = sum(a == b for a, b in zip(res32["predictions"], res8["predictions"])) / len(groups)
    print(json.dumps({
        "int8_path": describe(), "int8_error": round(int8.softprompt_int8_error, 4),
        "bleu_fp32": round(res32["bleu"], 2), "bleu_quantized": round(res8["bleu"], 2),
        "bleu_delta": round(res32["bleu"] - res8["bleu"], 2),
        "rouge_l_fp32": round(res32["rouge_l"], 2), "rouge_l_quantized": round(res8["rouge_l"], 2),
        "identical_outputs": round(same, 3), "seconds_fp32": round(t32, 1), "seconds_quantized": round(t8, 1),
        "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "examples": [{"prompt": g[0], "fp32": a, "int8": b} for g, a, b in
                     list(zip(groups, res32["predictions"], res8["predictions"]))[:5]],
    }))


KEYS = ["bleu_delta", "bleu_fp32", "bleu_quantized", "identical_outputs"]


def main():
    from record import Record, Sections, add_fail_section, isa_list, run_under_isa

    from softprompt.core.device import ISA_CAPS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dev-mrs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--artifact", help="serve this artifact instead of training one")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: the free cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--isa", default="native,avx2", help=f"the ISAs to score, each in a child process ({', '.join(ISA_CAPS)})")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    add_fail_section(ap)
    args = ap.parse_args()
    if args.quick:
        args.dev_mrs, args.steps = 24, 30
    if args.child:
        return child(args)
    isas = isa_list(ap, args.isa)
    full = (args.dev_mrs, args.steps, args.artifact) == (200, 150, None) and isas == ["native", "avx2"]
    rec = Record("quality_quantized", quick=args.quick, full=full)
    sections = Sections(fail=args.fail_section)
    result = {"dev_mrs": args.dev_mrs, "train_steps": None if args.artifact else args.steps, "quick": args.quick,
              "quantize": "int8: per-channel weights, per-row inputs (two levels but for the widening layers, "
                          "which are smoothed), shared products (softprompt/hf/quantize.py)", "isa": {}}
    artifact = args.artifact
    if artifact is None:
        from softprompt.core.device import set_threads
        from softprompt.io.load import load_base

        set_threads(args.threads)
        artifact = sections("train", lambda: str(trained_prefix(*load_base(device="cpu"), args.steps, args.seed)))
    if artifact is not None:
        result["artifact"] = artifact
        argv = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                ("dev-mrs", "max-new-tokens", "threads", "seed")] + [f"--artifact={artifact}"]
        for isa in isas:
            got = sections(isa, run_under_isa, __file__, isa, argv)
            if got is not None:
                result["isa"][isa] = got
                result.update({f"{k}_{isa}": got[k] for k in KEYS})
    sys.exit(rec.finish(result, [f"{k}_{isa}" for k in KEYS for isa in isas], sections, threads=args.threads))


if __name__ == "__main__":
    main()
