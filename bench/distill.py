"""A long prompt distilled into a few virtual tokens (issue 29), on the three long prompts that ship
in softprompt/assets/prompts/ (README.md there says how each is made), side by side in one run:

  quality   per prompt: the teacher is the frozen base given the whole prompt (compiled exactly,
            `compile_text`), the student a prefix of P virtual tokens (`--num-virtual-tokens`,
            default 16) distilled on unlabelled inputs from the data (`distill`: KL to the
            teacher's top-k over its greedy continuations). Inputs: weather records
            (softprompt/assets/weather_dev.jsonl, then weather_train.jsonl), E2E dev MRs, SST-2 dev
            sentences: `--inputs` distinct ones per prompt (never one of the prompt's own
            examples), a seeded share held out (DistillConfig.heldout) and never trained on.
            Teacher and student are scored on the held-out inputs against the data's labels:
            weather BLEU against the reference report (exact match beside it), E2E BLEU against all
            of an MR's references, SST-2 accuracy of the label word (softprompt/loops/evaluate.py
            `score`). agreement = student score / teacher score; compression = prompt tokens / P.
  serve     the engine (softprompt/serve/engine.py) serving `--tasks` tasks in mixed batches, the
            same `--requests` requests (random task each, the input of one of that task's
            prompt's inputs), greedy, `--new-tokens` each (EOS ignored, so both make the same
            tokens), twice: every task a compiled long prompt (distinct artifacts: task i is
            prompt i mod 3 with its own first line, "Task i of N.") against every task a distilled
            prefix of P tokens. The distilled tasks reuse the prompt's student with a small
            per-task noise (1% of its spread): speed does not depend on the values, and 64
            distinct prefixes are what a server would hold. Steady state: every prefix cached.
            serve_speedup = distilled tokens/s / compiled tokens/s (best of `--rounds` each).
  ttft      time to first token, one request at a time, of writing the prompt out as text before
            each request (bare model) against the distilled prefix (and the compiled one), median
            over `--ttft-requests` requests. ttft_speedup = written / distilled.

    python bench/distill.py                 # the full run (about an hour on 2 CPU cores: an estimate, not yet timed)
    python bench/distill.py --quick         # 40 inputs, 30 steps, 16 tasks: bench/results/distill_quick.json
    python bench/distill.py --prompts weather --inputs 60 --steps 60 --threads 2
    python bench/distill.py --base DIR ...  # another base (a tiny random one: the path runs, the scores mean nothing)

Writes bench/results/distill.json (--quick, or any option that changes what is measured:
distill_quick.json). The last line is `agreement_min=.. compression_min=.. serve_speedup=..`
(`_min`: the worst prompt), then the time-to-first-token figures, the engine's tokens/s, each
prompt's agreement, the longest distillation and the minutes the run took.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = ROOT.parent / "shared" / "data"
ASSETS = ROOT / "softprompt" / "assets"
PROMPTS = ("weather", "e2e", "sst2")
# The task score agreement is taken on: BLEU where the output is a sentence, the label word's accuracy for SST-2.
METRIC = {"weather": "bleu", "e2e": "bleu", "sst2": "accuracy"}
NOISE = 0.01  # per-task noise on the reused student, relative to its standard deviation
# size: (full run, --quick); None in the options means "this default"
SIZES = {"inputs": (200, 40), "steps": (None, 30), "tasks": (64, 16), "requests": (256, 64), "new_tokens": (32, 16),
         "rounds": (2, 1), "ttft_requests": (24, 6)}
MEASURED = ("base", "prompts", "num_virtual_tokens", "batch", "seed")  # with SIZES: what a full run holds fixed


# --------------------------------------------------------------------------------------------
# The prompts and their inputs (built at run time from ../shared/data: the data is never copied)


@dataclass
class BenchPrompt:
    """A long prompt, how an input becomes a request after it, and its labelled inputs (each input
    with all its references), distinct, in a seeded order, none of them one of the prompt's examples."""

    name: str
    text: str
    template: str
    stop: tuple[str, ...]
    max_new_tokens: int
    inputs: list[tuple[str, list[str]]]
    source: str  # where the inputs came from

    def request(self, x: str) -> str:
        return self.template.replace("{input}", x)


def _spec(name: str) -> dict:
    return json.loads((ASSETS / "prompts" / f"{name}.json").read_text())


def _e2e_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["mr"], r["ref"]) for r in csv.DictReader(f)]


def _sst2_rows(path: Path) -> list[tuple[str, str]]:
    # GLUE's TSV is not quoted (a sentence may hold a quote mark); many sentences end with a space
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _grouped(rows) -> dict[str, list[str]]:
    """input -> every label it has, in first-seen order."""
    out: dict[str, list[str]] = {}
    for x, y in rows:
        out.setdefault(x, []).append(y)
    return out


def _drawn(groups: dict[str, list[str]], shots: set[str], n: int, seed: int) -> list[tuple[str, list[str]]]:
    """n inputs (with their labels) in a seeded order, leaving out the prompt's own examples."""
    keys = [x for x in groups if x.strip() and x not in shots]
    random.Random(seed).shuffle(keys)
    return [(x, groups[x]) for x in keys[:n]]


def build_prompt(name: str, n_inputs: int, seed: int = 0, data: Path = DATA) -> BenchPrompt:
    """The prompt `name` as softprompt/assets/prompts/README.md describes it, and `n_inputs` of its
    inputs (`seed` orders the draw; the prompt's own shots are fixed by its JSON's seed)."""
    if name not in PROMPTS:
        raise ValueError(f"unknown prompt {name!r}; the bench's prompts are {', '.join(PROMPTS)}")
    spec = _spec(name)
    if name == "weather":
        text = (ASSETS / "prompts" / spec["prompt"]).read_text(encoding="utf-8")
        shots = set(re.findall(r"^Record: (.*)$", text, flags=re.M))
        rows, source = [], "softprompt/assets/weather_dev.jsonl, weather_train.jsonl"
        for file in ("weather_dev.jsonl", "weather_train.jsonl"):  # dev first: a small run draws from dev
            rows += [(r["input"], r["output"]) for r in map(json.loads, (ASSETS / file).read_text().splitlines())]
    elif name == "e2e":
        train = _e2e_rows(data / spec["source"])
        random.Random(spec["seed"]).shuffle(train)
        examples: dict[str, str] = {}
        for mr, ref in train:  # the first `shots` distinct MRs, each with the first reference seen
            if len(examples) == spec["shots"]:
                break
            examples.setdefault(mr, ref)
        text = spec["instruction"] + "".join(spec["example"].format(mr=mr, ref=ref) for mr, ref in examples.items())
        shots, rows, source = set(examples), _e2e_rows(data / spec["inputs"]), "../shared/data/" + spec["inputs"]
    else:  # sst2
        words = spec["label_words"]
        train = _sst2_rows(data / spec["source"])
        random.Random(spec["seed"]).shuffle(train)
        half = spec["shots"] // 2
        neg, pos = ([s for s, y in train if y == k][:half] for k in ("0", "1"))
        picked = [(s, k) for pair in zip(neg, pos) for s, k in zip(pair, ("0", "1"))]  # negative, positive, ...
        text = spec["instruction"] + "".join(spec["example"].format(sentence=s, label=words[k]) for s, k in picked)
        shots = {s for s, _ in picked}
        rows, source = [(s, words[y]) for s, y in _sst2_rows(data / spec["inputs"])], "../shared/data/" + spec["inputs"]
    return BenchPrompt(name, text, spec["template"], tuple(spec["stop"]), spec["max_new_tokens"],
                       _drawn(_grouped(rows), shots, n_inputs, seed), source)


def write_inputs(prompt: BenchPrompt, path: Path) -> Path:
    """The inputs as `distill` reads labelled ones: a JSONL row per (input, reference)."""
    with open(path, "w", encoding="utf-8") as f:
        for x, refs in prompt.inputs:
            for ref in refs:
                f.write(json.dumps({"input": x, "output": ref}) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Quality: teacher against student on held-out inputs


def agreement(student: float, teacher: float) -> float | None:
    """student / teacher, None where the teacher scores 0 (nothing to agree with)."""
    return round(student / teacher, 3) if teacher > 0 else None


def quality(model, tok, prompt: BenchPrompt, a, workdir: Path) -> tuple[dict, object]:
    """Distill `prompt` on its inputs; (its figures, the student's prefix (L, 2, H, P, D) on the CPU)."""
    from softprompt.runs.distill import DistillConfig, distill

    options = dict(template=prompt.template, stop=prompt.stop, max_new_tokens=prompt.max_new_tokens,
                   num_virtual_tokens=a.num_virtual_tokens, seed=a.seed, progress=not a.quiet,
                   out=str(Path(a.keep) / prompt.name) if a.keep else None, overwrite=True)
    if a.steps is not None:
        options["steps"] = a.steps
    inputs = write_inputs(prompt, workdir / f"{prompt.name}.jsonl")
    student, rep = distill(model, tok, prompt.text, str(inputs), DistillConfig.of(**options))
    teacher, student_score = rep["task_score"]["teacher"], rep["task_score"]["student"]
    metric = METRIC[prompt.name]
    figures = {
        "metric": metric, "teacher": teacher, "student": student_score,
        "agreement": agreement(student_score[metric], teacher[metric]),
        "agreement_by_metric": {k: agreement(student_score[k], teacher[k])
                                for k in ("bleu", "rouge_l", "exact_match", "accuracy")},
        "prompt_tokens": rep["prompt_tokens"], "num_virtual_tokens": rep["num_virtual_tokens"],
        "compression": round(rep["compression"], 2), "cache_bytes": rep["cache_bytes"],
        "inputs": {**rep["inputs"], "source": prompt.source}, "heldout": rep["heldout"], "init_kl": rep["init_kl"],
        "boundary_clean": rep["boundary_clean"], "seconds": {k: round(v, 1) for k, v in rep["seconds"].items()},
        "steps": rep["config"]["steps"], "examples": rep["examples"],
    }
    _say(a, f"{prompt.name}: {rep['prompt_tokens']} tokens -> {rep['num_virtual_tokens']} "
            f"({figures['compression']}x); {metric} teacher {teacher[metric]:.2f}, "
            f"student {student_score[metric]:.2f}, "
            f"agreement {figures['agreement']}; {rep['seconds']['total']:.0f} s")
    return figures, student.kv().detach().float().cpu()


# --------------------------------------------------------------------------------------------
# Serving: many compiled long prompts against as many distilled prefixes


def task_text(prompt: BenchPrompt, i: int, n: int) -> str:
    """Task i's long prompt: the prompt with a first line of its own, so each task is its own artifact."""
    return f"Task {i + 1} of {n}.\n" + prompt.text


def make_tasks(model, tok, prompts: list[BenchPrompt], students: dict, n: int, P: int):
    """({name: compiled long prompt}, {name: distilled prefix}, where each prompt's prefix came from):
    task i is prompts[i mod len(prompts)]; its distilled prefix is that prompt's student plus noise
    seeded by i (or, where the prompt was not distilled in this run, its compiled first P positions:
    the student's start, just as fast)."""
    import torch

    from softprompt.core.geometry import geometry
    from softprompt.methods import PrefixTuning
    from softprompt.runs.distill import compile_text

    if not prompts:
        raise RuntimeError("no prompt was built: nothing to serve")
    geo, compiled, distilled, source = geometry(model), {}, {}, {}
    for i in range(n):
        p = prompts[i % len(prompts)]
        name = f"task{i:03d}"
        compiled[name] = compile_text(model, tok, task_text(p, i, n))
        kv = students.get(p.name)
        source[p.name] = "student" if kv is not None else "prompt_init"
        if kv is None:
            kv = compiled[name].kv().detach()[:, :, :, :P]
        g = torch.Generator().manual_seed(i)
        noisy = kv + NOISE * kv.std() * torch.randn(kv.shape, generator=g, dtype=kv.dtype)
        distilled[name] = PrefixTuning.from_kv(geo, noisy, {"source": "bench_distill"})
    return compiled, distilled, source


def _nbytes(tasks: dict) -> int:
    return sum(t.kv().numel() * t.kv().element_size() for t in tasks.values())


def run_engine(model, tok, tasks: dict, requests: list[tuple[str, str]], a) -> tuple[float, float]:
    """(tokens/s, seconds) of one engine serving `requests` ((task, request text)) in mixed batches,
    every task's prefix already cached (cold loads are not what this measures)."""
    from softprompt.serve import Engine, Request

    engine = Engine(model, tok, tasks, max_batch_size=a.batch, max_queue=len(requests) + len(tasks),
                    prefix_cache_bytes=2 * _nbytes(tasks) + 1)
    engine.generate([Request(prompt=requests[0][1], task=name, max_new_tokens=1, add_special_tokens=False)
                     for name in tasks])  # loads (and caches) every task; warms the kernels
    reqs = [Request(prompt=text, task=task, max_new_tokens=a.new_tokens, ignore_eos=True, add_special_tokens=False)
            for task, text in requests]
    t0 = time.perf_counter()
    outs = engine.generate(reqs)
    dt = time.perf_counter() - t0
    assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs if o.error][:3]
    return sum(len(o.token_ids) for o in outs) / dt, dt


def serve_section(model, tok, prompts: list[BenchPrompt], students: dict, a) -> dict:
    rng = random.Random(a.seed)
    compiled, distilled, source = make_tasks(model, tok, prompts, students, a.tasks, a.num_virtual_tokens)
    names = list(compiled)
    requests = []
    for _ in range(a.requests):
        i = rng.randrange(len(names))
        p = prompts[i % len(prompts)]
        requests.append((names[i], p.request(rng.choice(p.inputs)[0])))
    best = {"compiled": (0.0, 0.0), "distilled": (0.0, 0.0)}
    for _ in range(a.rounds):  # alternating, each keeping its best: the least disturbed run on a shared machine
        for kind, tasks in (("compiled", compiled), ("distilled", distilled)):
            run = run_engine(model, tok, tasks, requests, a)
            _say(a, f"serve {kind}: {run[0]:.1f} tok/s ({run[1]:.1f} s)")
            best[kind] = max(best[kind], run)
    (tps_c, dt_c), (tps_d, dt_d) = best["compiled"], best["distilled"]
    return {"tokens_per_s_compiled": round(tps_c, 1), "tokens_per_s_distilled": round(tps_d, 1),
            "seconds_compiled": round(dt_c, 2), "seconds_distilled": round(dt_d, 2),
            "serve_speedup": round(tps_d / tps_c, 2),
            "cache_bytes_compiled": _nbytes(compiled), "cache_bytes_distilled": _nbytes(distilled),
            "distilled_from": source, "tasks": a.tasks, "requests": a.requests, "new_tokens": a.new_tokens,
            "batch": a.batch, "rounds": a.rounds}


def ttft_section(model, tok, prompts: list[BenchPrompt], students: dict, a) -> dict:
    """Time to first token, one request at a time: the prompt written out as text before the request
    (bare model) against the compiled and the distilled prefix; the modes take turns per request."""
    from softprompt.serve import Engine, Request

    k = len(prompts)
    compiled, distilled, _ = make_tasks(model, tok, prompts, students, k, a.num_virtual_tokens)
    engines = {"written": Engine(model, tok, None, max_batch_size=1),
               "compiled": Engine(model, tok, compiled, max_batch_size=1, prefix_cache_bytes=2 * _nbytes(compiled)),
               "distilled": Engine(model, tok, distilled, max_batch_size=1, prefix_cache_bytes=2 * _nbytes(distilled))}

    def once(kind: str, j: int, x: str):
        name, p = f"task{j:03d}", prompts[j]
        text = (task_text(p, j, k) if kind == "written" else "") + p.request(x)
        req = Request(prompt=text, task=None if kind == "written" else name, max_new_tokens=1,
                      add_special_tokens=False)
        t0 = time.perf_counter()
        out = engines[kind].generate([req])[0]
        return (time.perf_counter() - t0) * 1e3, out.token_ids

    for j, p in enumerate(prompts):  # warm-up: every prefix cached, every engine has run once
        for kind in engines:
            once(kind, j, p.inputs[0][0])
    ms = {kind: [] for kind in engines}
    same = 0  # the compiled prefix gives the written-out prompt's first token (it is exact; a sanity check)
    for r in range(a.ttft_requests):
        j = r % k
        x = prompts[j].inputs[(r // k) % len(prompts[j].inputs)][0]
        first = {}
        for kind in engines:
            t, first[kind] = once(kind, j, x)
            ms[kind].append(t)
        same += first["written"] == first["compiled"]
    med = {kind: round(statistics.median(v), 2) for kind, v in ms.items()}
    return {"ttft_written_ms": med["written"], "ttft_compiled_ms": med["compiled"],
            "ttft_distilled_ms": med["distilled"], "ttft_speedup": round(med["written"] / med["distilled"], 2),
            "ttft_requests": a.ttft_requests, "first_token_written_equals_compiled": same / a.ttft_requests}


# --------------------------------------------------------------------------------------------
# The run


def _say(a, msg: str) -> None:
    if not a.quiet:
        print(msg, file=sys.stderr, flush=True)


def parse(argv=None):
    from record import add_fail_section

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--base", metavar="DIR", help="a local HuggingFace model directory (default: the embedded model)")
    ap.add_argument("--prompts", default=",".join(PROMPTS), help=f"which of {','.join(PROMPTS)}")
    ap.add_argument("--num-virtual-tokens", type=int, default=16, help="the student's P")
    ap.add_argument("--steps", type=int, help="distillation steps (default: DistillConfig's; quick 30)")
    ap.add_argument("--inputs", type=int, help="distinct inputs per prompt, held-out share included (200; quick 40)")
    ap.add_argument("--tasks", type=int, help="tasks served (64; quick 16)")
    ap.add_argument("--requests", type=int, help="requests served per engine run (256; quick 64)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per served request (32; quick 16)")
    ap.add_argument("--batch", type=int, default=32, help="the engine's max batch size")
    ap.add_argument("--rounds", type=int, help="compiled/distilled alternations, best of each kept (2; quick 1)")
    ap.add_argument("--ttft-requests", type=int, help="requests timed one at a time per mode (24; quick 6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: softprompt's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--keep", metavar="DIR", help="keep each prompt's distillation run (student, report) here")
    ap.add_argument("--results", metavar="DIR", default=None, help="write the result here (default: bench/results)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_fail_section(ap)
    a = ap.parse_args(argv)
    for k, (whole, quick) in SIZES.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else whole)
    # the full result (distill.json) only from the embedded base at the full sizes
    full = not a.quick and all(getattr(a, k) == ap.get_default(k) for k in MEASURED) \
        and all(getattr(a, k) == whole for k, (whole, _) in SIZES.items())
    names = [n.strip() for n in a.prompts.split(",") if n.strip()]
    if not names or any(n not in PROMPTS for n in names):
        ap.error(f"--prompts takes a comma-separated choice of {', '.join(PROMPTS)}, got {a.prompts!r}")
    a.prompt_names = names
    return a, full


def headline(per_prompt: dict, serve: dict | None, ttft: dict | None) -> dict:
    """The last line's figures: the worst prompt's agreement and compression, then the serving ones."""
    out: dict = {}
    agreements = [f["agreement"] for f in per_prompt.values() if f["agreement"] is not None]
    if agreements:
        out["agreement_min"] = min(agreements)
    if per_prompt:
        out["compression_min"] = min(f["compression"] for f in per_prompt.values())
    out.update({k: v for k, v in (serve or {}).items() if k in ("serve_speedup", "tokens_per_s_compiled",
                                                                   "tokens_per_s_distilled")})
    out.update({k: v for k, v in (ttft or {}).items() if k.startswith("ttft_") and k != "ttft_requests"})
    out.update({f"agreement_{name}": f["agreement"] for name, f in per_prompt.items()})
    if per_prompt:
        out["distill_minutes_max"] = round(max(f["seconds"]["total"] for f in per_prompt.values()) / 60, 1)
    return out


KEYS = ["agreement_min", "compression_min", "serve_speedup", "ttft_speedup", "ttft_written_ms", "ttft_distilled_ms",
        "ttft_compiled_ms", "tokens_per_s_distilled", "tokens_per_s_compiled",
        *(f"agreement_{n}" for n in PROMPTS), "distill_minutes_max", "minutes"]


def main(argv=None) -> int:
    a, full = parse(argv)
    import torch
    from record import RESULTS, Record, Sections

    from softprompt.io.load import load_base

    if a.threads:
        torch.set_num_threads(a.threads)
    rec = Record("distill", quick=a.quick, full=full, results=Path(a.results) if a.results else RESULTS)
    sections = Sections(fail=a.fail_section)
    t0 = time.time()
    torch.manual_seed(a.seed)
    model, tok = load_base(a.base, device=a.device)
    prompts, per_prompt, students = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        for name in a.prompt_names:  # a prompt that cannot be built (its data missing) fails NAME_prompt
            p = sections(f"{name}_prompt", build_prompt, name, a.inputs, a.seed)
            done = p and sections(name, quality, model, tok, p, a, Path(tmp))
            prompts += [p] if p else []
            if done:
                per_prompt[name], students[name] = done
    serve = sections("serve", serve_section, model, tok, prompts, students, a)
    ttft = sections("ttft", ttft_section, model, tok, prompts, students, a)
    result = {"base": a.base or "embedded", "prompts": per_prompt, "serve": serve, "ttft": ttft,
              "num_virtual_tokens": a.num_virtual_tokens, "inputs_per_prompt": a.inputs, "seed": a.seed,
              "torch_threads": torch.get_num_threads(), "quick": a.quick,
              **headline(per_prompt, serve, ttft), "minutes": round((time.time() - t0) / 60, 1)}
    return rec.finish(result, KEYS, sections)


if __name__ == "__main__":
    sys.exit(main())
