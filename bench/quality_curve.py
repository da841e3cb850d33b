"""E2E data-efficiency curves: prefix tuning, prompt tuning, LoRA (r=8, q/v) and full fine-tuning
trained on subsets of 50 / 200 / 500 distinct training MRs (each with all its references; drawn per
seed, the smaller inside the larger), 3 seeds, scored on the same E2E dev MRs with all their
references; BLEU with sacrebleu's paired-bootstrap 95% interval and p-value against prefix tuning
(pooled over seeds). It is `softprompt compare --train-sizes ... --seeds ...` on E2E (runs/compare.py).

    python bench/quality_curve.py                # sizes 50/200/500, seeds 0,1,2, 100 dev MRs
    python bench/quality_curve.py --quick        # sizes 50/200, seed 0, 60 steps each, 24 dev MRs
    python bench/quality_curve.py --num-beams 5  # beam 5 (the papers' decoding) scored beside greedy

Steps per run (full): ceil(1 epoch x rows / batch 8), at least 40, at most 60 (--epochs, --min-steps,
--max-steps; sized for about 2 hours on 2 CPU cores, see docs/quality.md); --quick: 60 for every run. Writes bench/results/quality_curve.json and quality_curve.png (--quick: quality_curve_quick.*);
the last line is `prefix_minus_lora_min=.. prefix_minus_ft_lowdata=.. prompt_minus_prefix=..` (BLEU,
mean over seeds; `_min` over sizes; `lowdata` averaged over sizes 50 and 200; prompt_minus_prefix at
the largest size) and the minutes it took.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
E2E = ROOT.parent / "shared" / "data" / "e2e"
METHODS = ("prefix_tuning", "prompt_tuning", "lora", "full")
EPOCHS, MIN_STEPS, MAX_STEPS = 1.0, 40, 60  # sized for ~2 h on 2 CPU cores (docs/quality.md)


def headline(points: list[dict]) -> dict:
    """The last line's figures from the curve's points (BLEU mean over seeds)."""
    bleu = {(p["method"], p["size"]): p["bleu_mean"] for p in points}
    sizes = sorted({p["size"] for p in points})
    out = {}
    if all(("lora", n) in bleu for n in sizes):
        out["prefix_minus_lora_min"] = round(min(bleu["prefix_tuning", n] - bleu["lora", n] for n in sizes), 2)
    low = [n for n in sizes if n in (50, 200)] or sizes[:1]
    if all(("full", n) in bleu for n in low):
        out["prefix_minus_ft_lowdata"] = round(sum(bleu["prefix_tuning", n] - bleu["full", n] for n in low) / len(low),
                                               2)
    if ("prompt_tuning", sizes[-1]) in bleu:
        out["prompt_minus_prefix"] = round(bleu["prompt_tuning", sizes[-1]] - bleu["prefix_tuning", sizes[-1]], 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None, help="training sizes in distinct MRs (default 50,200,500; quick 50,200)")
    ap.add_argument("--seeds", default=None, help="default 0,1,2; quick 0")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dev-mrs", type=int, default=None, help="dev MRs scored (default 100; quick 24)")
    ap.add_argument("--num-beams", type=int, default=1, help="> 1: beam search scored beside greedy")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=EPOCHS)
    ap.add_argument("--min-steps", type=int, default=None, help=f"default {MIN_STEPS}; quick 60")
    ap.add_argument("--max-steps", type=int, default=None, help=f"default {MAX_STEPS}; quick 60")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--keep", metavar="DIR", help="keep every run's files (models, outputs) here")
    a = ap.parse_args()
    sizes = a.sizes or ("50,200" if a.quick else "50,200,500")
    seeds = a.seeds or ("0" if a.quick else "0,1,2")
    n_dev = a.dev_mrs or (24 if a.quick else 100)
    min_steps = a.min_steps or (60 if a.quick else MIN_STEPS)
    max_steps = a.max_steps if a.max_steps is not None else (60 if a.quick else MAX_STEPS)
    import torch

    torch.set_num_threads(a.threads)
    from record import Record

    from softprompt.io.load import load_base
    from softprompt.runs.compare import run_compare
    from softprompt.runs.config import CompareConfig, RunConfig

    rec = Record("quality_curve", quick=a.quick)
    t0 = time.time()
    model, tok = load_base(device=a.device)
    out = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="quality_curve_"))
    try:
        run = RunConfig.of(train_data=str(E2E / "trainset.csv"), eval_data=str(E2E / "devset.csv"),
                           template="{mr} ||", target="ref", max_length=256, skip_bad_rows=True,
                           out=str(out), steps=min_steps, batch_size=a.batch_size, progress=False,
                           device=a.device, threads=a.threads)
        cfg = CompareConfig(run, methods=a.methods, train_sizes=sizes, seeds=seeds, eval_inputs=n_dev,
                            eval_max_new_tokens=64, num_beams=a.num_beams, epochs=0.0 if a.quick else a.epochs,
                            max_steps=max_steps)
        report = run_compare(cfg, model, tok)
        rec.path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "compare.png", rec.path.with_suffix(".png"))
        table = (out / "compare.md").read_text()
    finally:
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
    minutes = (time.time() - t0) / 60
    cells = report["cells"]
    steps = sum(c["steps"] for c in cells)
    per_step = {m: sum(c["train_s"] for c in cells if c["method"] == m) /
                max(1, sum(c["steps"] for c in cells if c["method"] == m)) for m in report["methods"]}
    score_s = {m: sum(c.get("score_s", 0) for c in cells if c["method"] == m) /
               max(1, sum(1 for c in cells if c["method"] == m)) for m in report["methods"]}
    result = {**report, "table": table, "minutes": round(minutes, 1), "train_steps": steps,
              "seconds_per_step": {m: round(v, 3) for m, v in per_step.items()},
              "score_seconds_per_run": {m: round(v, 1) for m, v in score_s.items()},
              **headline(report["points"])}
    print(table, file=sys.stderr)
    keys = ["prefix_minus_lora_min", "prefix_minus_ft_lowdata", "prompt_minus_prefix", "minutes"]
    sys.exit(rec.finish(result, keys, threads=a.threads if a.device == "cpu" else a.device))


if __name__ == "__main__":
    main()
