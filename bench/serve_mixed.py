"""Serving many tasks from one model: our engine's mixed batches against PEFT at its best.

64 distinct tasks (prefix tuning and prompt tuning, 10 and 20 virtual tokens) saved as artifacts,
256 requests in random task order, prompts of 20 to 60 tokens (E2E meaning representations),
32 new tokens each, on the embedded SmolLM2-135M. Measured side by side in one run:
  (a) engine   our engine, rows of different tasks sharing each forward pass (continuous batching)
  (b) peft     PEFT at its best: requests grouped by adapter, set_adapter, one batched generate per group
  (c) base     the same engine and batch size with no prefix at all: the physical limit for (a)
plus bytes per cached task and what a cold task costs, from a prompt store (see below).

Task loads, per method (prefix tuning, prompt tuning), through the engine's own load path (name ->
store index -> prefix), in milliseconds:
  first_serve  a task published without a model: its first load compiles it and stores the result
  cold         not in the prefix cache, and each file's first read in the process (so hashed):
               a restarted server (the worst case; `task_load_p99_ms` is the worse method's)
  evicted      not in the prefix cache, its files already checked: a task evicted and asked again
  warm         in the prefix cache
  uncompiled   the old path, for reference: artifact read, checks, method module, forward pass
Decode steps while tasks load: a full batch of running rows, and every third step a request for
a cold task arrives (it waits, the batch being full; its load runs beside the loop). Steps that
overlap a load are compared with the median of the load-free steps around them (within 6 steps:
the rows' caches grow through the run, so a global median would flatter early steps and blame late
ones): `step_p99_vs_median` is the p99 of that ratio, `step_p99_quiet_vs_median` the same for the
load-free steps themselves, the machine's own noise.
(Admitting a request into the batch costs its prefill in that step whether its task was cold or
not; the batch is full here so that what is measured is the load alone.)

    python bench/serve_mixed.py            # the full run (~6 min on 2 CPU cores)
    python bench/serve_mixed.py --quick    # 16 tasks, 64 requests, 16 new tokens: bench/results/serve_mixed_quick.json
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from record import Record, Sections, add_fail_section  # noqa: E402

from softprompt import methods
from softprompt.io.artifact import save_artifact
from softprompt.io.load import load_base
from softprompt.io.peft import export_peft
from softprompt.serve import Engine, Request  # noqa: E402
from softprompt.serve.tasks import Task, TaskRegistry, compile_task  # noqa: E402
from softprompt.store import compiled
from softprompt.store.core import Store

METHODS = ("prefix_tuning", "prompt_tuning")

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "trainset.csv"


def make_prompts(tok, n, rng):
    """n prompts of 20 to 60 tokens, cut from E2E meaning representations (or filler text)."""
    texts = []
    if E2E.exists():
        with open(E2E, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                texts.append(row["mr"] + " || " + row["ref"])
                if i > 4 * n:
                    break
    else:
        texts = ["name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], area[riverside] " * 3]
    prompts = []
    for _ in range(n):
        ids = tok(rng.choice(texts), add_special_tokens=False)["input_ids"]
        while len(ids) < 60:
            ids = ids + ids
        prompts.append(ids[: rng.randint(20, 60)])
    return prompts


def task_prompt(model, tok, i: int):
    """The i-th benchmark task: even i prefix tuning, odd i prompt tuning; P alternates 10 / 20 by pairs."""
    method = "prefix_tuning" if i % 2 == 0 else "prompt_tuning"
    P = 10 if (i // 2) % 2 == 0 else 20
    opts = dict(projection_dim=0, init="text", init_text=f"Task {i}: describe the restaurant.") \
        if method == "prefix_tuning" else dict(init="vocab")
    return methods.create(method, model, tok, num_virtual_tokens=P, seed=i, **opts)


def make_tasks(model, tok, n_tasks, root: Path):
    """n_tasks artifacts (see task_prompt), each also exported as a PEFT adapter."""
    tasks = {}
    for i in range(n_tasks):
        prompt = task_prompt(model, tok, i)
        method = prompt.method
        path = save_artifact(prompt, root / f"task{i:03d}", model)
        export_peft(prompt, root / f"peft{i:03d}", model)
        tasks[f"task{i:03d}"] = (path, root / f"peft{i:03d}", method)
    return tasks


def pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def load_times(model, tok, tasks, store, rounds):
    """{method: {kind: [ms]}} for the kinds in the module docstring, through Engine._load_task (the
    path a request takes: resolve the name in the store's index, then the prefix cache or a load)."""
    ms = {m: {k: [] for k in ("first_serve", "cold", "evicted", "warm", "uncompiled")} for m in METHODS}

    def timed(engine, name):
        t0 = time.perf_counter()
        engine._load_task(name, background=False).result()
        return (time.perf_counter() - t0) * 1e3

    engine = Engine(model, tok, TaskRegistry(fallback=store.entry))
    for name, (_, _, method) in tasks.items():  # published without a model: the first serve compiles
        ms[method]["first_serve"].append(timed(engine, name))
    # each kind in a loop of its own, so that no kind is timed right after another kind's forward pass
    # (the uncompiled path runs one per prompt-tuning task, and leaves every cache cold behind it)
    for _ in range(rounds):
        compiled._verified.clear()  # as a restarted server: each file hashed on its first read
        engine = Engine(model, tok, TaskRegistry(fallback=store.entry))  # an empty prefix cache
        for name, (_, _, method) in tasks.items():
            ms[method]["cold"].append(timed(engine, name))
        for name, (_, _, method) in tasks.items():
            ms[method]["warm"].append(timed(engine, name))
        engine = Engine(model, tok, TaskRegistry(fallback=store.entry))  # an empty cache, files already hashed
        for name, (_, _, method) in tasks.items():
            ms[method]["evicted"].append(timed(engine, name))
        for name, (path, _, method) in tasks.items():
            t0 = time.perf_counter()
            compile_task(Task(name, path), model)
            ms[method]["uncompiled"].append((time.perf_counter() - t0) * 1e3)
    return ms


def steps_while_loading(model, tok, tasks, store, prompts, batch, n_loads):
    """([(step ms, overlapped a cold load?)] in order, load ms seen by the engine's cache)."""
    names = list(tasks)
    warm, cold = names[:batch], names[batch:] or names
    # room for two prefixes: every cold load evicts, so a task named again is cold again
    engine = Engine(model, tok, TaskRegistry(fallback=store.entry), max_batch_size=batch,
                    prefix_cache_bytes=2 * 921_600)
    n_steps = 3 * n_loads
    rows = [engine.submit(Request(prompt_ids=prompts[i % len(prompts)], task=warm[i % len(warm)],
                                  max_new_tokens=n_steps + 4, ignore_eos=True)) for i in range(batch)]
    engine.step()  # all admitted (nothing was running: their tasks load on the loop)
    assert engine.status()["running_rows"] == batch
    engine.prefixes.load_ms.clear()
    steps, late = [], None
    for i in range(n_steps):
        if i % 3 == 0:  # a request for a cold task: it waits (the batch is full) while its task loads
            late = engine.submit(Request(prompt_ids=[1, 2], task=cold[(i // 3) % len(cold)], max_new_tokens=1))
        t0 = time.perf_counter()
        engine.step()
        steps.append(((time.perf_counter() - t0) * 1e3, i % 3 != 2))
        if i % 3 == 1:
            late.cancel()  # its load is done or under way; the request itself is not what is measured
    assert engine.status()["running_rows"] == batch and not any(r.done for r in rows)
    for r in rows:
        r.cancel()
    engine.step()
    return steps, list(engine.prefixes.load_ms)


def step_ratios(steps, window=6):
    """(ratios of the steps that overlapped a load, ratios of the others): each step's time over the
    median of the load-free steps within `window` steps of it (itself left out). A local median,
    because the rows' caches grow through the run and a step late in it is longer anyway."""
    loading, quiet = [], []
    for j, (ms, overlapped) in enumerate(steps):
        near = [m for k, (m, o) in enumerate(steps) if not o and k != j and abs(k - j) <= window]
        (loading if overlapped else quiet).append(ms / pct(near, 0.5))
    return loading, quiet


def run_engine(model, tok, requests, tasks, batch, use_prefix=True):
    engine = Engine(model, tok, {name: p for name, (p, _, _) in tasks.items()}, max_batch_size=batch)
    if use_prefix:  # steady state: every task's prefix cached (cold loads are measured on their own)
        engine.generate([Request(prompt_ids=[1, 2], task=name, max_new_tokens=1) for name in tasks])
        engine.stats.update(steps=0, batch_rows_sum=0)
    reqs = [Request(prompt_ids=ids, task=task if use_prefix else None, max_new_tokens=n, ignore_eos=True)
            for task, ids, n in requests]
    t0 = time.perf_counter()
    outs = engine.generate(reqs)
    dt = time.perf_counter() - t0
    assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs if o.error][:3]
    return sum(len(o.token_ids) for o in outs) / dt, dt, engine


def run_peft(model, tok, requests, tasks, batch):
    """PEFT at its best: one PeftModel per method holding every adapter; group by adapter, batch generate."""
    from peft import PeftModel

    wrappers = {}
    for name, (_, peft_dir, method) in tasks.items():
        if method not in wrappers:
            wrappers[method] = PeftModel.from_pretrained(model, peft_dir, adapter_name=name).eval()
        else:
            wrappers[method].load_adapter(peft_dir, adapter_name=name)
    groups: dict[str, list] = {}
    for task, ids, n in requests:
        groups.setdefault(task, []).append((ids, n))
    generated = 0
    t0 = time.perf_counter()
    for task, items in groups.items():
        pm = wrappers[tasks[task][2]]
        pm.set_adapter(task)
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            enc = tok.pad({"input_ids": [ids for ids, _ in chunk]}, return_tensors="pt", padding_side="left")
            n = max(k for _, k in chunk)
            with torch.no_grad():
                out = pm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
            generated += (out.shape[1] - enc["input_ids"].shape[1]) * len(chunk)
    dt = time.perf_counter() - t0
    for pm in wrappers.values():  # unwrap: prompt-learning PEFT leaves the base model untouched
        del pm
    return generated / dt, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="engine/base alternations (best of each is kept)")
    ap.add_argument("--load-rounds", type=int, default=5, help="cold/warm load measurements per task")
    ap.add_argument("--loads", type=int, default=40, help="cold loads during the decode-step measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_fail_section(ap)
    args = ap.parse_args()
    full = (args.tasks, args.requests, args.new_tokens, args.batch) == (64, 256, 32, 32)
    if args.quick:
        args.tasks, args.requests, args.new_tokens, args.loads = 16, 64, 16, 20
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = Record("serve_mixed", quick=args.quick, full=full)
    sections = Sections(fail=args.fail_section)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tok = load_base()
    root = Path(tempfile.mkdtemp(prefix="serve_mixed_"))
    tasks = make_tasks(model, tok, args.tasks, root)
    names = list(tasks)
    prompts = make_prompts(tok, args.requests, rng)
    requests = [(rng.choice(names), ids, args.new_tokens) for ids in prompts]
    result = {"tasks": args.tasks, "requests": args.requests, "new_tokens": args.new_tokens, "batch": args.batch,
              "torch_threads": torch.get_num_threads(), "quick": args.quick, "rounds": args.rounds,
              "load_rounds": args.load_rounds}

    # the tasks published to a prompt store without a model, as `softprompt store add` does
    store = Store(root / "store")
    for name, (path, _, _) in tasks.items():
        store.add(name, path)
    result.update(sections("loads", loads_section, model, tok, tasks, store, prompts, args) or {})
    print(f"{args.tasks} tasks, {args.requests} requests, {args.new_tokens} new tokens, batch {args.batch}",
          file=sys.stderr)
    result.update(sections("engine", engine_section, model, tok, requests, tasks, args) or {})
    peft = sections("peft", run_peft, model, tok, requests, tasks, args.batch)
    if peft is not None:
        tps_peft, dt_peft = peft
        print(f"peft:   {tps_peft:.1f} tok/s ({dt_peft:.1f} s)", file=sys.stderr)
        result.update(tokens_per_s_peft=round(tps_peft, 1), seconds_peft=round(dt_peft, 2))
        if result.get("tokens_per_s_engine"):
            result["speedup_vs_peft"] = round(result["tokens_per_s_engine"] / tps_peft, 2)
    # the int8 base against the bare float32 model, side by side (bench/serve_quantized.py)
    from serve_quantized import compare as compare_quantized

    quantized = sections("quantized", compare_quantized, model, tok, requests, tasks, args.batch, args.rounds)
    if quantized is not None:
        result["quantized"] = quantized
        result["quantized_vs_fp32_base"] = quantized["quantized_vs_fp32_base"]
    keys = ["ratio_vs_base", "speedup_vs_peft", "task_load_p99_ms", "task_load_p50_ms", "step_p99_vs_median",
            "tokens_per_s_engine", "tokens_per_s_peft", "tokens_per_s_base", "bytes_per_cached_task",
            "quantized_vs_fp32_base"]
    sys.exit(rec.finish(result, keys, sections))


def loads_section(model, tok, tasks, store, prompts, args) -> dict:
    """Cold, warm and evicted task loads, and decode steps while tasks load (the module docstring)."""
    ms = load_times(model, tok, tasks, store, args.load_rounds)
    task_load = {m: {f"{k}_{q}": pct(v, qq) for k, v in kinds.items() for q, qq in (("p50", 0.5), ("p99", 0.99))}
                 for m, kinds in ms.items()}
    for m, row in task_load.items():
        print(f"{m}: " + " ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr)
    steps, in_engine = steps_while_loading(model, tok, tasks, store, prompts, min(args.batch, args.tasks // 2),
                                           args.loads)
    loading, quiet = [ms for ms, o in steps if o], [ms for ms, o in steps if not o]
    r_loading, r_quiet = step_ratios(steps)
    step = {"step_median_ms": pct(quiet, 0.5), "step_p99_while_loading_ms": pct(loading, 0.99),
            "step_median_while_loading_ms": pct(loading, 0.5), "steps_measured": len(steps),
            "step_p99_vs_median": round(pct(r_loading, 0.99), 3),
            # the same ratio for the steps with no load: the machine's own noise, for comparison
            "step_p99_quiet_vs_median": round(pct(r_quiet, 0.99), 3),
            "load_in_engine_p50_ms": pct(in_engine, 0.5), "load_in_engine_p99_ms": pct(in_engine, 0.99),
            "loads_in_engine": len(in_engine)}
    print(" ".join(f"{k}={v}" for k, v in step.items()), file=sys.stderr)
    # cold loads from the store, the worse of the two methods
    return {"task_load_p50_ms": max(task_load[m]["cold_p50"] for m in METHODS),
            "task_load_p99_ms": max(task_load[m]["cold_p99"] for m in METHODS),
            "task_load_ms": task_load, **step}


def engine_section(model, tok, requests, tasks, args) -> dict:
    """The engine's mixed batches against the same engine with no prefix (the module docstring)."""
    run_engine(model, tok, requests[:8], tasks, args.batch)  # warm-up
    # engine and base alternate for `rounds` rounds and each keeps its best: the machine is shared and
    # noisy, and the best run is the one least disturbed
    best_engine = best_base = (0.0, 0.0, None)
    for _ in range(args.rounds):
        run = run_engine(model, tok, requests, tasks, args.batch)
        print(f"engine: {run[0]:.1f} tok/s ({run[1]:.1f} s)", file=sys.stderr)
        best_engine = max(best_engine, run, key=lambda x: x[0])
        run = run_engine(model, tok, requests, tasks, args.batch, use_prefix=False)
        print(f"base:   {run[0]:.1f} tok/s ({run[1]:.1f} s)", file=sys.stderr)
        best_base = max(best_base, run, key=lambda x: x[0])
    (tps_engine, dt_engine, engine), (tps_base, dt_base, _) = best_engine, best_base
    st = engine.status()
    return {"tokens_per_s_engine": round(tps_engine, 1), "tokens_per_s_base": round(tps_base, 1),
            "seconds_engine": round(dt_engine, 2), "seconds_base": round(dt_base, 2),
            "ratio_vs_base": round(tps_engine / tps_base, 3),
            "bytes_per_cached_task": int(st["prefix_cache"]["bytes"] / max(1, st["prefix_cache"]["tasks"])),
            "mean_batch_rows": round(st["batch_rows_sum"] / max(1, st["steps"]), 1)}


if __name__ == "__main__":
    main()
