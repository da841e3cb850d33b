"""Side by side: prefix tuning, prompt tuning and LoRA (through PEFT) on the same data and budget.

Each method trains for the same steps and batch size on the same training rows (ours through the
normal training loop, length-grouped batches; LoRA through a plain AdamW loop drawing its batches
uniformly with the same seed: same data and budget, not identical batches), and is scored with the
same held-out inputs (the first `eval_inputs` distinct held-out inputs, with all their references):
target-only cross-entropy (`eval_loss`, lower is better) and the task metric for generation, BLEU
and ROUGE-L of greedy outputs against every reference of the input (`evaluate.score`, the same
code as `softprompt eval`). Reported per method: trainable parameters, artifact bytes, train time,
peak memory during training (CUDA: peak allocated; CPU: peak resident memory above what the
process held before, sampled every 5 ms), decoding tokens/s with 1 task and with 16 tasks mixed in
one batch, eval_loss, BLEU and ROUGE-L. Each method's outputs go to OUT/METHOD/predictions.jsonl.

Inference: ours through the serving `Engine` (16 requests, each naming one of 16 distinct
artifacts, or all the same one); LoRA through PEFT's `generate` with 16 adapters loaded and
`adapter_names` per row (PEFT's mixed-batch LoRA inference), or one adapter. The two stacks differ
(our engine vs transformers' generate), which the report says.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from softprompt.loops.train import Dist
from softprompt.runs.config import RUN_DEFAULTS, CompareConfig, RunConfig  # noqa: F401

METHODS = ("prefix_tuning", "prompt_tuning", "lora")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the start: CUDA peak allocated, else sampled resident set size."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = _rss()
            self._stop = threading.Event()
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self._t.join()
            self.bytes = max(self.peak, _rss()) - self.start


class _LoraCall:
    """Makes a PEFT model look like a prompt to `target_loss`/`eval_loss`: call(model, ids, mask, **kw)."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, model, input_ids, attention_mask, **kw):
        return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)


def _train_lora(model, tok, train_tok, eval_tok, cfg: "CompareConfig", out: Path):
    steps, batch_size, lr, r = cfg.run.train.steps, cfg.run.train.batch_size, cfg.lora_lr, cfg.lora_r
    seed, progress = cfg.run.train.seed, cfg.run.output.progress
    from peft import LoraConfig, get_peft_model

    from softprompt.loops.data import collate
    from softprompt.loops.train import eval_loss, target_loss

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                          target_modules=["q_proj", "v_proj"]))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    call = _LoraCall(pm)
    dev = next(model.parameters()).device
    pm.train()
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="lora", unit="step", disable=not progress, dynamic_ncols=True):
        idx = torch.randint(0, len(train_tok), (batch_size,), generator=g).tolist()
        ids, mask, tmask = collate([train_tok.ids[i] for i in idx], [train_tok.n_target[i] for i in idx],
                                   tok.pad_token_id)
        loss, n = target_loss(call, pm, ids.to(dev), mask.to(dev), tmask.to(dev))
        opt.zero_grad()
        (loss / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        opt.step()
    pm.eval()
    with torch.no_grad():
        ev = eval_loss(call, pm, eval_tok, batch_size, tok.pad_token_id) if eval_tok else None
    pm.save_pretrained(out)
    return pm, sum(p.numel() for p in params), ev


def _heldout(eval_ex, n: int):
    """The first `n` distinct held-out inputs (0: all) as [(prompt, [references])], and their rows:
    eval_loss and BLEU/ROUGE-L then describe the same inputs, and the cost stays bounded (E2E's 20%
    held out is ~8,000 rows)."""
    from softprompt.loops.data import group_references

    groups = group_references(eval_ex)
    if n:
        groups = groups[:n]
    keep = {p for p, _ in groups}
    return groups, [e for e in eval_ex if e.prompt in keep]


def _score(model, tok, groups, prefix, max_new_tokens: int, batch_size: int, path: Path) -> dict:
    """BLEU / ROUGE-L (and exact match) of greedy outputs under one KV prefix `(L, 2, H_kv, P, D)` or
    none (a LoRA model); writes one JSON line per input (prompt, output, references) to `path`."""
    from softprompt.loops.evaluate import evaluate_groups

    if not groups:
        return {"bleu": None, "rouge_l": None, "exact_match": None}
    t0 = time.perf_counter()
    with torch.no_grad():
        res = evaluate_groups(model, tok, groups, prefix, max_new_tokens=max_new_tokens, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p if isinstance(p, str) else str(p), "output": h,
                                        "references": refs}) + "\n"
                            for (p, refs), h in zip(groups, res["predictions"])))
    return {"bleu": res["bleu"], "rouge_l": res["rouge_l"], "exact_match": res["exact_match"],
            "score_s": time.perf_counter() - t0}


def _tokens_per_s(fn, n_tokens_fn) -> float:
    t0 = time.perf_counter()
    result = fn()
    return n_tokens_fn(result) / (time.perf_counter() - t0)


def _engine_tps(model, tok, artifacts: list[str], prompts: list[str], max_new_tokens: int) -> float:
    from softprompt.serve import Engine, Request

    engine = Engine(model, tok, {f"t{i}": a for i, a in enumerate(artifacts)}, max_batch_size=len(prompts))
    reqs = lambda: [Request(task=f"t{i % len(artifacts)}", prompt=p, max_new_tokens=max_new_tokens, ignore_eos=True)
                    for i, p in enumerate(prompts)]
    engine.generate(reqs())  # warm: prefixes made and cached, as a server would have them
    return _tokens_per_s(lambda: engine.generate(reqs()), lambda outs: sum(len(o.token_ids) for o in outs))


def _peft_tps(pm, tok, names: list[str], prompts: list[str], max_new_tokens: int) -> float:
    enc = tok(prompts, return_tensors="pt", padding=True).to(next(pm.parameters()).device)
    rows = [names[i % len(names)] for i in range(len(prompts))]

    def run():
        with torch.no_grad():
            return pm.generate(**enc, adapter_names=rows, max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    run()
    return _tokens_per_s(run, lambda o: (o.shape[1] - enc["input_ids"].shape[1]) * o.shape[0])


def method_run(run: RunConfig, method: str, out: Path) -> RunConfig:
    """The comparison's run for one prompt method: the same data, budget, seed and P."""
    d = run.to_dict()  # the split is written as plain {input, output} rows: no template, no target
    return RunConfig.from_dict({**d, "method": method, "output": {**d["output"], "out": str(out)}, "data": {},
                                "prompt": {"num_virtual_tokens": run.prompt.num_virtual_tokens},
                                "train": {**d["train"], "checkpoint_every": 0}})


def run_compare(cfg: CompareConfig, model=None, tokenizer=None) -> dict:
    """Train and measure every method; writes OUT/compare.{json,md,png} and returns the report.

    `eval_inputs`: held-out distinct inputs scored (0: all); `eval_max_new_tokens`: the longest
    output generated for BLEU/ROUGE-L (`max_new_tokens` is only for the tokens/s measurement).
    """
    from softprompt.io.artifact import load_artifact, save_artifact
    from softprompt.loops.data import read_examples, split_heldout, tokenize
    from softprompt.loops.train import eval_loss
    from softprompt.runs.train import GenerateTask, run_train

    run = cfg.run
    if run.train_data is None:
        raise ValueError("--data is required (training data; same formats as train)")
    data, out, eval_data, seed = run.train_data, run.output.out, run.eval_data, run.train.seed
    steps, batch_size, progress, num_virtual_tokens = run.train.steps, run.train.batch_size, run.output.progress, \
        run.prompt.num_virtual_tokens
    tasks, eval_inputs, max_new_tokens, eval_max_new_tokens = cfg.tasks, cfg.eval_inputs, cfg.max_new_tokens, \
        cfg.eval_max_new_tokens
    lora_r = cfg.lora_r
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from softprompt.runs.train import apply_model_config

        apply_model_config(run.model)
        model, tokenizer = GenerateTask().load(run, Dist())
    device = str(next(model.parameters()).device)
    dcfg = run.data
    train_ex = read_examples(data, dcfg)
    if eval_data:
        eval_ex = read_examples(eval_data, dcfg)
    else:
        train_ex, eval_ex = split_heldout(train_ex, run.eval_fraction, seed)
    groups, eval_ex = _heldout(eval_ex, eval_inputs) if eval_ex else ([], [])
    eval_tok = tokenize(eval_ex, tokenizer, dcfg) if eval_ex else None
    # distinct held-out inputs for the tokens/s rows too (E2E repeats each input ~8 times)
    prompts = [p if isinstance(p, str) else str(p) for p, _ in groups] or [
        ex.prompt if isinstance(ex.prompt, str) else str(ex.prompt) for ex in train_ex]
    prompts = (prompts * tasks)[:tasks]
    rows = []
    # the training split as plain {input, output} rows (chat-message rows are not supported here yet)
    split_dir = out / "data"
    split_dir.mkdir(exist_ok=True)
    (split_dir / "train.jsonl").write_text("".join(json.dumps({"input": e.prompt, "output": e.target}) + "\n"
                                                   for e in train_ex))
    def stage(i: int, what: str) -> None:
        if progress:
            print(f"compare [{i}/3] {what}", file=sys.stderr, flush=True)

    for i, method in enumerate(("prefix_tuning", "prompt_tuning"), 1):
        stage(i, f"{method}: training {steps} steps, then scoring {len(groups)} held-out inputs and timing {tasks} tasks")
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            mrun = method_run(replace(run, train_data=str(split_dir / "train.jsonl"), eval_data=None,
                                      eval_fraction=0.0), method, out / method)
            res = run_train(mrun, model, tokenizer)
            train_s = time.perf_counter() - t0
        art = out / method / "last"
        prompt = load_artifact(art, model)
        eval_l = None
        if eval_tok:
            with torch.no_grad():
                eval_l = eval_loss(prompt, model, eval_tok, batch_size, tokenizer.pad_token_id)
        with torch.no_grad():
            kv = prompt.to_kv_prefix(model)  # (L, 2, H_kv, P, D): what serving uses, compiled once
        scores = _score(model, tokenizer, groups, kv, eval_max_new_tokens, batch_size,
                        out / method / "predictions.jsonl")
        trainable = GenerateTask().prompt(mrun, model, tokenizer, None).num_trainable_parameters()
        # 16 distinct tasks: the trained prompt plus small perturbations (same cost as 16 trained ones)
        arts = [str(art)]
        for i in range(1, tasks):
            t = {k: v + 1e-3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
                 for k, v in prompt.export_tensors().items()}
            arts.append(str(save_artifact(type(prompt).from_export(prompt.geometry, prompt.config_dict(), t),
                                          out / method / "tasks" / f"t{i}.safetensors", model)))
        rows.append({"method": method, "trainable_parameters": trainable, "artifact_bytes": prompt.artifact_bytes(),
                     "train_s": train_s, "peak_memory_bytes": mem.bytes, "train_loss": res.train_loss,
                     "eval_loss": eval_l, **scores,
                     "tokens_per_s_1_task": _engine_tps(model, tokenizer, arts[:1], prompts, max_new_tokens),
                     "tokens_per_s_mixed": _engine_tps(model, tokenizer, arts, prompts, max_new_tokens),
                     "inference": "softprompt Engine"})
    # LoRA through PEFT, on the same rows (the model is modified in place by PEFT: done last)
    train_tok = tokenize(train_ex, tokenizer, dcfg)
    stage(3, f"lora (PEFT, r={lora_r}): training {steps} steps, then scoring and timing")
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        pm, trainable, eval_l = _train_lora(model, tokenizer, train_tok, eval_tok, cfg, out / "lora")
        train_s = time.perf_counter() - t0
    lora_bytes = sum(t.numel() * t.element_size() for n, t in pm.state_dict().items() if "lora_" in n)
    # scored before more adapters are loaded, with the trained one active: `model` now holds PEFT's
    # LoRA layers in place, so the same greedy decoding as the prompts runs, with no prefix
    scores = _score(model, tokenizer, groups, None, eval_max_new_tokens, batch_size, out / "lora" / "predictions.jsonl")
    pm.load_adapter(str(out / "lora"), adapter_name="a0")
    names = ["a0"]
    for i in range(1, tasks):
        pm.load_adapter(str(out / "lora"), adapter_name=f"a{i}")
        names.append(f"a{i}")
    rows.append({"method": "lora", "trainable_parameters": trainable, "artifact_bytes": lora_bytes,
                 "train_s": train_s, "peak_memory_bytes": mem.bytes, "train_loss": None, "eval_loss": eval_l,
                 **scores,
                 "tokens_per_s_1_task": _peft_tps(pm, tokenizer, names[:1], prompts, max_new_tokens),
                 "tokens_per_s_mixed": _peft_tps(pm, tokenizer, names, prompts, max_new_tokens),
                 "inference": "PEFT generate (adapter_names per row)"})
    report = {"data": str(data), "steps": steps, "batch_size": batch_size, "num_virtual_tokens": num_virtual_tokens,
              "lora_r": lora_r, "tasks_mixed": tasks, "max_new_tokens": max_new_tokens, "device": device,
              "eval_inputs": len(groups), "eval_references": sum(len(r) for _, r in groups),
              "eval_max_new_tokens": eval_max_new_tokens,
              "metric": "eval_loss (held-out target cross-entropy; lower is better); BLEU and ROUGE-L (greedy, "
                        "all references of each held-out input; higher is better)", "rows": rows}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(markdown(report))
    chart(report, out / "compare.png")
    return report


def markdown(report: dict) -> str:
    n = report["tasks_mixed"]
    lines = [f"| method | trainable params | artifact bytes | train s | peak memory MB | tok/s 1 task | tok/s {n} tasks "
             f"mixed | eval_loss | BLEU | ROUGE-L |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731  (no held-out data: no metric)
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {r['artifact_bytes']:,} | {r['train_s']:.1f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['tokens_per_s_1_task']:.1f} | "
                     f"{r['tokens_per_s_mixed']:.1f} | {fmt(r['eval_loss'], '.4f')} | {fmt(r.get('bleu'), '.1f')} | "
                     f"{fmt(r.get('rouge_l'), '.1f')} |")
    lines.append("")
    lines.append(f"{report['steps']} steps x batch {report['batch_size']} each, P = {report['num_virtual_tokens']}, "
                 f"LoRA r = {report['lora_r']} (q_proj, v_proj); {report['max_new_tokens']} new tokens per row, "
                 f"{n} rows; device {report['device']}. Inference: prompts through the softprompt engine, LoRA "
                 "through PEFT generate with per-row adapter_names. eval_loss, BLEU and ROUGE-L on the same "
                 f"{report.get('eval_inputs', 0)} held-out inputs ({report.get('eval_references', 0)} references): "
                 f"greedy, at most {report.get('eval_max_new_tokens', 0)} new tokens, cut at the first newline.")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["method"] for r in rows]
    panels = [("trainable parameters", "trainable_parameters", True), ("artifact bytes", "artifact_bytes", True),
              ("train time (s)", "train_s", False), ("peak memory (MB)", "peak_memory_bytes", False),
              ("tokens/s, 1 task", "tokens_per_s_1_task", False),
              (f"tokens/s, {report['tasks_mixed']} tasks mixed", "tokens_per_s_mixed", False),
              ("held-out eval_loss (lower is better)", "eval_loss", False),
              ("held-out BLEU (higher is better)", "bleu", False),
              ("held-out ROUGE-L (higher is better)", "rouge_l", False)]
    fig, axes = plt.subplots(3, 3, figsize=(9.5, 8.5))  # 9 panels
    for ax, (title, key, log) in zip(axes.flat, panels):
        vals = [(r.get(key) or 0) / (2**20 if key == "peak_memory_bytes" else 1) for r in rows]
        ax.bar(names, vals, color=["tab:blue", "tab:orange", "tab:green"][:len(rows)])
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    # fixed margins: tight_layout renders the figure once more just to measure it (~2x the time)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.96, bottom=0.08, wspace=0.35, hspace=0.55)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
