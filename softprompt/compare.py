"""Side by side: prefix tuning, prompt tuning and LoRA (through PEFT) on the same data and budget.

Each method trains for the same steps and batch size on the same training rows (ours through the
normal training loop, length-grouped batches; LoRA through a plain AdamW loop drawing its batches
uniformly with the same seed: same data and budget, not identical batches), and is scored with the
same held-out metric: target-only cross-entropy (`eval_loss`, lower is better). Reported per method:
trainable parameters, artifact bytes, train time, peak memory during training (CUDA: peak
allocated; CPU: peak resident memory above what the process held before, sampled every 5 ms),
decoding tokens/s with 1 task and with 16 tasks mixed in one batch, and eval_loss.

Inference: ours through the serving `Engine` (16 requests, each naming one of 16 distinct
artifacts, or all the same one); LoRA through PEFT's `generate` with 16 adapters loaded and
`adapter_names` per row (PEFT's mixed-batch LoRA inference), or one adapter. The two stacks differ
(our engine vs transformers' generate), which the report says.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch

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


def _train_lora(model, tok, train_tok, eval_tok, steps, batch_size, lr, r, seed, out: Path):
    from peft import LoraConfig, get_peft_model

    from .data import collate
    from .train import eval_loss, target_loss

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                          target_modules=["q_proj", "v_proj"]))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    call = _LoraCall(pm)
    dev = next(model.parameters()).device
    pm.train()
    for step in range(steps):
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


def _tokens_per_s(fn, n_tokens_fn) -> float:
    t0 = time.perf_counter()
    result = fn()
    return n_tokens_fn(result) / (time.perf_counter() - t0)


def _engine_tps(model, tok, artifacts: list[str], prompts: list[str], max_new_tokens: int) -> float:
    from .serve import Engine, Request

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


def run_compare(data: str, out: str, base: str | None = None, template: str | None = None, target: str | None = None,
                eval_data: str | None = None, eval_fraction: float = 0.2, steps: int = 50, batch_size: int = 8,
                num_virtual_tokens: int = 20, lora_r: int = 8, lora_lr: float = 1e-3, seed: int = 0,
                max_new_tokens: int = 16, tasks: int = 16, model=None, tokenizer=None) -> dict:
    from . import methods as M
    from .artifact import load_artifact, save_artifact
    from .data import DataConfig, read_examples, split_heldout, tokenize
    from .runs import default_lr, method_options, run_train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from .models import load_base

        model, tokenizer = load_base(base)
    device = str(next(model.parameters()).device)
    dcfg = DataConfig(template=template, target=target)
    train_ex = read_examples(data, dcfg)
    if eval_data:
        eval_ex = read_examples(eval_data, dcfg)
    else:
        train_ex, eval_ex = split_heldout(train_ex, eval_fraction, seed)
    eval_tok = tokenize(eval_ex, tokenizer, dcfg) if eval_ex else None
    prompts = [ex.prompt if isinstance(ex.prompt, str) else str(ex.prompt) for ex in (eval_ex or train_ex)]
    prompts = (prompts * tasks)[:tasks]
    rows = []
    # the training split as plain {input, output} rows (chat-message rows are not supported here yet)
    split_dir = out / "data"
    split_dir.mkdir(exist_ok=True)
    (split_dir / "train.jsonl").write_text("".join(json.dumps({"input": e.prompt, "output": e.target}) + "\n"
                                                   for e in train_ex))
    for method in ("prefix_tuning", "prompt_tuning"):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            res = run_train(str(split_dir / "train.jsonl"), str(out / method), method=method,
                            num_virtual_tokens=num_virtual_tokens, steps=steps, batch_size=batch_size, seed=seed,
                            checkpoint_every=0, progress=False, model=model, tokenizer=tokenizer)
            train_s = time.perf_counter() - t0
        art = out / method / "last"
        prompt = load_artifact(art, model)
        eval_l = None
        if eval_tok:
            from .train import eval_loss

            with torch.no_grad():
                eval_l = eval_loss(prompt, model, eval_tok, batch_size, tokenizer.pad_token_id)
        trainable = M.create(method, model, tokenizer, **method_options(
            method, num_virtual_tokens, None, None, 512, seed)).num_trainable_parameters()
        # 16 distinct tasks: the trained prompt plus small perturbations (same cost as 16 trained ones)
        arts = [str(art)]
        for i in range(1, tasks):
            t = {k: v + 1e-3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
                 for k, v in prompt.export_tensors().items()}
            arts.append(str(save_artifact(type(prompt).from_export(prompt.geometry, prompt.config_dict(), t),
                                          out / method / "tasks" / f"t{i}.safetensors", model)))
        rows.append({"method": method, "trainable_parameters": trainable, "artifact_bytes": prompt.artifact_bytes(),
                     "train_s": train_s, "peak_memory_bytes": mem.bytes, "train_loss": res.train_loss,
                     "eval_loss": eval_l,
                     "tokens_per_s_1_task": _engine_tps(model, tokenizer, arts[:1], prompts, max_new_tokens),
                     "tokens_per_s_mixed": _engine_tps(model, tokenizer, arts, prompts, max_new_tokens),
                     "inference": "softprompt Engine"})
    # LoRA through PEFT, on the same rows (the model is modified in place by PEFT: done last)
    train_tok = tokenize(train_ex, tokenizer, dcfg)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        pm, trainable, eval_l = _train_lora(model, tokenizer, train_tok, eval_tok, steps, batch_size, lora_lr,
                                            lora_r, seed, out / "lora")
        train_s = time.perf_counter() - t0
    lora_bytes = sum(t.numel() * t.element_size() for n, t in pm.state_dict().items() if "lora_" in n)
    pm.load_adapter(str(out / "lora"), adapter_name="a0")
    names = ["a0"]
    for i in range(1, tasks):
        pm.load_adapter(str(out / "lora"), adapter_name=f"a{i}")
        names.append(f"a{i}")
    rows.append({"method": "lora", "trainable_parameters": trainable, "artifact_bytes": lora_bytes,
                 "train_s": train_s, "peak_memory_bytes": mem.bytes, "train_loss": None, "eval_loss": eval_l,
                 "tokens_per_s_1_task": _peft_tps(pm, tokenizer, names[:1], prompts, max_new_tokens),
                 "tokens_per_s_mixed": _peft_tps(pm, tokenizer, names, prompts, max_new_tokens),
                 "inference": "PEFT generate (adapter_names per row)"})
    report = {"data": str(data), "steps": steps, "batch_size": batch_size, "num_virtual_tokens": num_virtual_tokens,
              "lora_r": lora_r, "tasks_mixed": tasks, "max_new_tokens": max_new_tokens, "device": device,
              "metric": "eval_loss (held-out target cross-entropy; lower is better)", "rows": rows}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(markdown(report))
    chart(report, out / "compare.png")
    return report


def markdown(report: dict) -> str:
    n = report["tasks_mixed"]
    lines = [f"| method | trainable params | artifact bytes | train s | peak memory MB | tok/s 1 task | tok/s {n} tasks "
             f"mixed | eval_loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ev = "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {r['artifact_bytes']:,} | {r['train_s']:.1f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['tokens_per_s_1_task']:.1f} | "
                     f"{r['tokens_per_s_mixed']:.1f} | {ev} |")
    lines.append("")
    lines.append(f"{report['steps']} steps x batch {report['batch_size']} each, P = {report['num_virtual_tokens']}, "
                 f"LoRA r = {report['lora_r']} (q_proj, v_proj); {report['max_new_tokens']} new tokens per row, "
                 f"{n} rows; device {report['device']}. Inference: prompts through the softprompt engine, LoRA "
                 "through PEFT generate with per-row adapter_names.")
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
              ("held-out eval_loss (lower is better)", "eval_loss", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4))
    for ax, (title, key, log) in zip(axes, panels):
        vals = [(r[key] or 0) / (2**20 if key == "peak_memory_bytes" else 1) for r in rows]
        ax.bar(names, vals, color=["tab:blue", "tab:orange", "tab:green"][:len(rows)])
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
