"""The off-task guard (issue 31, item 5) on an E2E prefix, side by side in one run:

  train     an E2E prefix on the embedded SmolLM2-135M-Instruct (`sp.train` on `--train-rows`
            rows of ../shared/data/e2e/trainset.csv, template "{mr} ||", a seeded 20% held out),
            which writes the guard's summary beside out/best as every training run does
            (runs/train.py write_offtask: its distinct training MRs fitted, under the prefix, at
            layer L//2, k 16; threshold the 99th percentile of the held-out MRs' scores).
  auc       ROC AUC of the score separating in-task inputs (`--inputs` distinct dev-set MRs,
            none seen in training) from SST-2 dev sentences (../shared/data/sst2/dev.tsv) and
            from the probe set that ships with the project (softprompt/assets/probes/offtask.jsonl:
            general questions, other languages, requests a base refuses), each scored as the
            engine scores a request (the prompt under the prefix, pooled). Also the share of each
            set past the threshold (in-task: the false-alarm rate; off-task: the catch rate).
  serve     the engine serving `--requests` requests to the E2E task (a third each E2E, SST-2,
            probes), greedy, `--new-tokens` each (EOS ignored), with off_task=None (no guard) and
            off_task="warn" alternately, best of `--rounds`: tokens/s of each (throughput_change,
            noisy on a shared machine), the guarded run's tokens checked equal to the plain run's,
            and scoring_share: the engine's own clock of its guard work (stats off_task_seconds)
            over the run's time. Then the guard where it costs most, one prefill of `--batch`
            requests, with and without it, alternated (`--rounds` x 5, medians): prefill_change
            (the whole passes compared: on a shared machine, noise of a few % either way) and
            guard_cost = guard_ms / the plain prefill, guard_ms the guard's own work timed apart
            from the forward pass (its hook set up and removed, pooling, scores; the hook's call
            inside the pass only stores a reference). Decoding is untouched, so this bounds the
            guard's share of serving from above.

    python bench/offtask.py --quick --threads 1    # 400 rows, 30 steps: bench/results/offtask_quick.json
    python bench/offtask.py                        # bench/results/offtask.json

The last line: `auc_sst2=.. auc_probes=.. guard_cost=.. ...`.
"""

from __future__ import annotations

import argparse
import csv
import json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = ROOT.parent / "shared" / "data"
PROBES = ROOT / "softprompt" / "assets" / "probes" / "offtask.jsonl"
SIZES = {"train_rows": (4000, 400), "steps": (150, 30), "inputs": (500, 150), "requests": (96, 48),
         "new_tokens": (16, 8), "rounds": (3, 2)}
KEYS = ["auc_sst2", "auc_probes", "guard_cost", "guard_ms", "prefill_change", "scoring_share", "throughput_change",
        "flagged_in_task", "flagged_sst2", "flagged_probes", "tokens_per_s_plain", "tokens_per_s_guarded",
        "tokens_equal", "prefill_ms_plain", "prefill_ms_guarded", "summary_bytes", "minutes"]


def e2e_mrs(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(dict.fromkeys(row["mr"] for row in csv.DictReader(f)))


def e2e_rows(n: int, seed: int) -> list[dict]:
    with open(DATA / "e2e" / "trainset.csv", newline="", encoding="utf-8") as f:
        rows = [{"input": f"{r['mr']} ||", "output": r["ref"]} for r in csv.DictReader(f)]
    return random.Random(seed).sample(rows, n)


def sst2(n: int, seed: int) -> list[str]:
    with open(DATA / "sst2" / "dev.tsv", newline="", encoding="utf-8") as f:
        rows = [r["sentence"].strip() for r in csv.DictReader(f, delimiter="\t")]
    return random.Random(seed).sample(rows, min(n, len(rows)))


def probes() -> list[str]:
    return [json.loads(line)["input"] for line in PROBES.read_text(encoding="utf-8").splitlines() if line.strip()]


def train(model, tok, a, out: Path) -> dict:
    import softprompt as sp

    prompt = sp.create(model, sp.PrefixTuningConfig(num_virtual_tokens=10), tok)
    t0 = time.time()
    sp.train(prompt, model, tok, e2e_rows(a.train_rows, a.seed), out=out, steps=a.steps, batch_size=8,
             eval_fraction=0.2, eval_every=a.steps, progress=False)
    return {"seconds": round(time.time() - t0, 1), "steps": a.steps, "train_rows": a.train_rows}


def auc_section(model, tok, artifact: Path, a) -> dict:
    from softprompt.core.offtask import auc
    from softprompt.io.artifact import load_artifact, read_card
    from softprompt.io.offtask import read_summary
    from softprompt.loops.offtask import pooled_states, prompt_kv

    s = read_summary(artifact, read_card(artifact))
    kv = prompt_kv(model, load_artifact(artifact, model))
    enc = (lambda texts: [tok(t, add_special_tokens=False)["input_ids"] for t in texts])
    seen = {r["input"] for r in e2e_rows(a.train_rows, a.seed)}
    dev = [f"{m} ||" for m in e2e_mrs(DATA / "e2e" / "devset.csv") if f"{m} ||" not in seen]
    sets = {"in_task": random.Random(a.seed).sample(dev, min(a.inputs, len(dev))),
            "sst2": sst2(a.inputs, a.seed), "probes": probes()}
    t0 = time.time()
    scores = {k: s.score(pooled_states(model, enc(v), kv, s.layer, batch_size=16)) for k, v in sets.items()}
    res = {"layer": s.layer, "k": s.k, "threshold": s.threshold, "summary_bytes": artifact.joinpath(
        "offtask.safetensors").stat().st_size, "summary_meta": s.meta, "sizes": {k: len(v) for k, v in sets.items()},
        "auc_sst2": round(auc(scores["sst2"], scores["in_task"]), 4),
        "auc_probes": round(auc(scores["probes"], scores["in_task"]), 4),
        "median_score": {k: round(float(v.median()), 3) for k, v in scores.items()},
        "scoring_seconds": round(time.time() - t0, 1)}
    res.update({f"flagged_{k}": round(float((v > s.threshold).double().mean()), 4) for k, v in scores.items()})
    return res


def serve_section(model, tok, artifact: Path, a) -> dict:
    from softprompt.serve import Engine, Request

    rng = random.Random(a.seed + 1)
    pools = [[f"{m} ||" for m in e2e_mrs(DATA / "e2e" / "devset.csv")], sst2(a.requests, a.seed + 1), probes()]
    prompts = [rng.choice(pools[i % 3]) for i in range(a.requests)]

    def run(policy):
        engine = Engine(model, tok, {"e2e": str(artifact)}, max_batch_size=a.batch, off_task=policy)
        engine.generate([Request(prompt=prompts[0], task="e2e", max_new_tokens=2)])  # the prefix loaded, warm
        t0 = time.perf_counter()
        outs = engine.generate([Request(prompt=p, task="e2e", max_new_tokens=a.new_tokens, ignore_eos=True)
                                for p in prompts])
        dt = time.perf_counter() - t0
        return sum(len(o.token_ids) for o in outs) / dt, outs, engine

    best = {None: 0.0, "warn": 0.0}
    outs, share = {}, []
    for _ in range(a.rounds):  # alternate, so a busy moment on the machine falls on both
        for policy in (None, "warn"):
            t0 = time.perf_counter()
            tps, outs[policy], engine = run(policy)
            best[policy] = max(best[policy], tps)
            if policy:
                share.append(engine.stats["off_task_seconds"] / (time.perf_counter() - t0))
    equal = all(p.token_ids == g.token_ids for p, g in zip(outs[None], outs["warn"]))
    flagged = sum(bool(o.off_task and o.off_task.off_task) for o in outs["warn"])
    prefill = prefill_cost(model, tok, artifact, prompts[:a.batch], a.rounds * 5)
    return {"tokens_per_s_plain": round(best[None], 1), "tokens_per_s_guarded": round(best["warn"], 1),
            "throughput_change": round(best["warn"] / best[None] - 1, 4), "tokens_equal": equal,
            "scoring_share": round(min(share), 5), **prefill,
            "requests": a.requests, "new_tokens": a.new_tokens, "batch": a.batch, "rounds": a.rounds,
            "flagged_requests": flagged}


def prefill_cost(model, tok, artifact: Path, prompts: list[str], reps: int) -> dict:
    """The guard where it costs most, the prefill: one batch of requests prefilled under the task's
    prefix as the engine does, without and with the guard (the hook, the pooling, the scores),
    alternated `reps` times; the median of each. Decoding, which the guard never touches, is left
    out, so this bounds the guard's share of serving from above."""
    import statistics

    import torch

    from softprompt import hf
    from softprompt.core.offtask import pool
    from softprompt.hf.prefix import prefixed_forward
    from softprompt.io.artifact import load_artifact, read_card
    from softprompt.io.offtask import read_summary
    from softprompt.loops.offtask import prompt_kv

    s = read_summary(artifact, read_card(artifact))
    kv = prompt_kv(model, load_artifact(artifact, model))
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1

    def once(guard: bool) -> tuple[float, float]:
        """(the prefill's seconds, the guard's own seconds: its hooks set up and removed, pooling, scores)."""
        t0 = time.perf_counter()
        capture = hf.layer_outputs(model, [s.layer] if guard else [])
        got = capture.__enter__()
        t1 = time.perf_counter()
        with torch.no_grad():
            prefixed_forward(model, ids, mask, [kv] * len(rows), use_cache=True, logits_to_keep=1, growing=True)
        t2 = time.perf_counter()
        capture.__exit__(None, None, None)
        if guard:
            for i, r in enumerate(rows):
                s.judge(float(s.score(pool(got[s.layer][i:i + 1], [len(r)]))[0]), "warn")
        t3 = time.perf_counter()
        return t3 - t0, (t1 - t0) + (t3 - t2)

    times = {False: [], True: []}
    own = []
    once(False)
    for _ in range(reps):
        for guard in (False, True):
            total, extra = once(guard)
            times[guard].append(total)
            own += [extra] if guard else []
    plain, guarded = statistics.median(times[False]), statistics.median(times[True])
    mine = statistics.median(own)
    return {"prefill_ms_plain": round(plain * 1e3, 2), "prefill_ms_guarded": round(guarded * 1e3, 2),
            "prefill_change": round(guarded / plain - 1, 4), "guard_ms": round(mine * 1e3, 3),
            "guard_cost": round(mine / plain, 5), "prefill_reps": reps}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-rows", type=int, help="E2E training rows (4000; quick 400)")
    ap.add_argument("--steps", type=int, help="training steps (150; quick 30)")
    ap.add_argument("--inputs", type=int, help="inputs per scored set (500; quick 150)")
    ap.add_argument("--requests", type=int, help="requests per engine run (96; quick 48)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per request (16; quick 8)")
    ap.add_argument("--rounds", type=int, help="plain/guarded alternations, best of each kept (3; quick 2)")
    ap.add_argument("--batch", type=int, default=16, help="the engine's max batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--keep", metavar="DIR", help="keep the training run here; reuse it if it is there")
    ap.add_argument("--results", metavar="DIR", default=None, help="write the result here (default: bench/results)")
    a = ap.parse_args(argv)
    for k, (whole, quick) in SIZES.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else whole)
    return a


def main(argv=None) -> int:
    a = parse(argv)
    import torch
    from record import RESULTS, Record, Sections

    from softprompt.io.load import load_base

    if a.threads:
        torch.set_num_threads(a.threads)
    rec = Record("offtask", quick=a.quick, results=Path(a.results) if a.results else RESULTS)
    sections = Sections()
    t0 = time.time()
    torch.manual_seed(a.seed)
    model, tok = load_base()
    with tempfile.TemporaryDirectory(prefix="bench_offtask_") as tmp:
        run_dir = Path(a.keep) if a.keep else Path(tmp) / "run"
        artifact = run_dir / "best"
        trained = {"reused": str(run_dir)} if (artifact / "offtask.safetensors").is_file() else \
            sections("train", train, model, tok, a, run_dir)
        scored = sections("auc", auc_section, model, tok, artifact, a) if trained else None
        served = sections("serve", serve_section, model, tok, artifact, a) if trained else None
    result = {"base": "embedded", "train": trained, "auc": scored, "serve": served, "seed": a.seed,
              "torch_threads": torch.get_num_threads(), "quick": a.quick, "probes": str(PROBES.relative_to(ROOT)),
              **{k: v for part in (scored, served) for k, v in (part or {}).items() if k in KEYS},
              "minutes": round((time.time() - t0) / 60, 1)}
    return rec.finish(result, KEYS, sections)


if __name__ == "__main__":
    sys.exit(main())
