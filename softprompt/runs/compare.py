"""Side by side: prefix tuning, prompt tuning, P-tuning, LoRA (through PEFT) and full fine-tuning on
the same data and budget (`methods`: any subset, in the order given).

Each method trains for the same steps and batch size on the same training rows: the prompt methods
through the normal training loop (length-grouped batches), full fine-tuning through the same loop
and batches on a copy of the base with every weight trainable (AdamW at `full_lr`), LoRA through a
plain AdamW loop drawing its batches uniformly with the same seed (same data and budget, not
identical batches). All are scored on the same held-out inputs (the first `eval_inputs` distinct
held-out inputs, with all their references): target-only cross-entropy (`eval_loss`, lower is
better) and the task metric for generation, BLEU and ROUGE-L of greedy outputs against every
reference of the input (`evaluate.score`, the same code as `softprompt eval`), and with
`num_beams` > 1 of beam-search outputs beside them. BLEU comes with sacrebleu's paired bootstrap
(`evaluate.paired_bootstrap`): a 95% interval, and the p-value against prefix tuning (against the
first method when prefix tuning is not compared). Reported per method: trainable parameters,
artifact bytes (full fine-tuning: its safetensors, OUT/full/model, which reloads with
`from_pretrained`), train time, peak memory during training (CUDA: peak allocated; CPU: peak
resident memory above what the process held before, sampled every 5 ms; full fine-tuning's
includes its copy of the weights), decoding tokens/s with 1 task and with 16 tasks mixed in one
batch, eval_loss, BLEU and ROUGE-L. Each method's outputs go to OUT/METHOD/predictions.jsonl.

Inference: the prompt methods through the serving `Engine` (16 requests, each naming one of 16
distinct artifacts, or all the same one); LoRA through PEFT's `generate` with 16 adapters loaded and
`adapter_names` per row (PEFT's mixed-batch LoRA inference), or one adapter; full fine-tuning
through transformers' `generate` (one task: 16 tasks would be 16 copies of the model, no mixed
batch). The stacks differ (our engine vs transformers' generate), which the report says.

Data-efficiency curves (`train_sizes`, `seeds`): per seed, subsets of that many distinct training
inputs are drawn (`loops.data.subset_inputs`: each input with all its rows, the smaller inside the
larger), every method is trained on each (steps by `steps_for`, printed), and scored on the same
held-out inputs; per size and method the report gives the mean and standard deviation over seeds,
and BLEU's interval and p-value from the paired bootstrap over the seeds' outputs pooled (each
held-out input once per seed, paired across methods by seed and input). No tokens/s there.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from softprompt.loops.train import Dist
from softprompt.runs.config import (COMPARE_METHODS, DEFAULT_COMPARE_METHODS, RUN_DEFAULTS,  # noqa: F401
                                    CompareConfig, RunConfig)

METHODS = COMPARE_METHODS
PROMPT_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning")
BASELINE = "prefix_tuning"  # what every p-value is against (the first method when it is not compared)


SCORE_BATCH = 32  # held-out inputs decoded at once when scoring (at least the training batch)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim), so that the resident set at
    the start of a measurement is what is in use. Without it, memory an earlier method freed stays
    resident and the next method's growth reads near zero (1 MB for prefix tuning after a full
    fine-tuning had run). Elsewhere than glibc: nothing is released, and the figure may read low."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the start: CUDA peak allocated, else sampled resident set size (after the
    heap's free pages went back to the OS)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _release_free_heap()
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
    """The first `n` distinct held-out inputs (0: all) as [(prompt, [references])], and the row of
    each input's first reference: eval_loss and BLEU/ROUGE-L then describe the same inputs, and the
    cost stays bounded. One row per input, not all: E2E's 100 dev MRs have 804 references, and their
    loss took 88 s per scored run on 2 cores (decoding them, 35 s), most of a curve's scoring time."""
    from softprompt.loops.data import group_references

    groups = group_references(eval_ex)
    if n:
        groups = groups[:n]
    first: dict = {}
    for e in eval_ex:
        first.setdefault(e.prompt, e)
    return groups, [first[p] for p, _ in groups]


def _score(model, tok, groups, prefix, max_new_tokens: int, batch_size: int, path: Path, num_beams: int = 1,
           length_penalty: float = 1.0) -> dict:
    """BLEU / ROUGE-L (and exact match) of greedy (or beam-search) outputs under one KV prefix
    `(L, 2, H_kv, P, D)` or none (a LoRA or fine-tuned model); writes one JSON line per input
    (prompt, output, references) to `path`, and returns the outputs under "predictions"."""
    from softprompt.loops.evaluate import evaluate_groups

    if not groups:
        return {"bleu": None, "rouge_l": None, "exact_match": None}
    t0 = time.perf_counter()
    with torch.no_grad():
        res = evaluate_groups(model, tok, groups, prefix, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              num_beams=num_beams, length_penalty=length_penalty)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p if isinstance(p, str) else str(p), "output": h,
                                        "references": refs}) + "\n"
                            for (p, refs), h in zip(groups, res["predictions"])))
    return {"bleu": res["bleu"], "rouge_l": res["rouge_l"], "exact_match": res["exact_match"],
            "score_s": time.perf_counter() - t0, "predictions": res["predictions"]}


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


class FullFineTune:
    """A copy of the base with every weight trainable, behind the loop's prompt protocol
    (`prompt(model, ids, mask, **kw)`, `parameters()`): the training loop, its batches, schedule and
    loss are the prompt methods' own. The copy stays in eval mode, as the frozen base does for them."""

    method = "full"

    def __init__(self, model):
        self.model = model

    def __call__(self, model, input_ids, attention_mask, **kw):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)

    def parameters(self):
        return self.model.parameters()

    def state_dict(self):
        return self.model.state_dict()

    def train(self):
        pass

    def eval(self):
        pass


def train_full(model, tokenizer, train_tok, eval_tok, run: RunConfig, lr: float, out: Path | None,
               progress: bool = False):
    """Full fine-tuning of a copy of `model` on `train_tok` for `run.train.steps` steps (the same loop and
    batches as the prompt methods); saves it with `save_pretrained` (safetensors) to `out` when given.
    Returns (the trained copy, trainable parameters, held-out eval_loss or None, last train loss)."""
    from softprompt.loops.train import Trainer, TrainerOutput, eval_loss

    tuned = copy.deepcopy(model).requires_grad_(True)
    tcfg = replace(run.train, lr=lr, checkpoint_every=0, eval_every=0, eval_generate=0, metric="eval_loss",
                   patience=0)
    res = Trainer(tuned, tokenizer, FullFineTune(tuned), train_tok, tcfg,
                  output=TrainerOutput(progress=progress)).run()
    tuned.requires_grad_(False)
    with torch.no_grad():
        ev = eval_loss(FullFineTune(tuned), tuned, eval_tok, run.train.batch_size, tokenizer.pad_token_id) \
            if eval_tok else None
    if out is not None:
        tuned.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return tuned, sum(p.numel() for p in tuned.parameters()), ev, res.train_loss


def steps_for(rows: int, cfg: CompareConfig) -> int:
    """Steps for a run on `rows` training rows in a curve: `epochs` passes over them, at least the run's
    `steps`, at most `max_steps` (0: no cap)."""
    floor, batch = cfg.run.train.steps, cfg.run.train.batch_size
    n = max(floor, math.ceil(cfg.epochs * rows / batch))
    return min(n, cfg.max_steps) if cfg.max_steps else n


def steps_rule(cfg: CompareConfig) -> str:
    rule = f"steps = ceil({cfg.epochs:g} epochs x training rows / batch {cfg.run.train.batch_size})"
    floor, cap = cfg.run.train.steps, cfg.max_steps
    if cap and cap <= floor:  # the cap wins over the floor (steps_for): say only what decides
        return f"{rule}, at most {cap}"
    return f"{rule}, at least {floor}" + (f", at most {cap}" if cap else "")


def _hf_tps(model, tok, prompts: list[str], max_new_tokens: int) -> float:
    """tokens/s of transformers' greedy `generate` over `prompts` in one batch (full fine-tuning)."""
    enc = tok(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)

    def run():
        with torch.no_grad():
            return model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tok.pad_token_id)

    run()
    return _tokens_per_s(run, lambda o: (o.shape[1] - enc["input_ids"].shape[1]) * o.shape[0])


def _decode_scores(model, tok, groups, prefix, cfg: CompareConfig, mdir: Path) -> dict:
    """Greedy scores (and beam-search ones with `num_beams` > 1) of one trained method; the outputs
    go to mdir/predictions.jsonl (and predictions_beam{K}.jsonl), and under "predictions" here.
    Decoding runs SCORE_BATCH inputs at a time: each row's output is its own whatever the batch
    (left padding, per-row positions), and on 2 cores 48 inputs at once took half the time of 8."""
    bs = max(cfg.run.train.batch_size, SCORE_BATCH)
    s = _score(model, tok, groups, prefix, cfg.eval_max_new_tokens, bs, mdir / "predictions.jsonl")
    if cfg.num_beams > 1 and groups:
        b = _score(model, tok, groups, prefix, cfg.eval_max_new_tokens, bs,
                   mdir / f"predictions_beam{cfg.num_beams}.jsonl", num_beams=cfg.num_beams,
                   length_penalty=cfg.length_penalty)
        s.update({f"{k}_beam": v for k, v in b.items()})
    return s


def _cell(cfg: CompareConfig, model, tokenizer, train_ex, eval_tok, groups, out: Path, prompts: list[str] | None,
          stage) -> list[dict]:
    """Train every method of `cfg` on `train_ex` with `cfg.run`'s steps and seed, and score each on
    `groups`; `prompts`: also time decoding with them (None: no timing). Rows keep their outputs
    under "predictions" (and "predictions_beam") for the bootstrap; the caller drops them."""
    from softprompt.io.artifact import load_artifact, save_artifact
    from softprompt.loops.data import tokenize
    from softprompt.loops.train import eval_loss
    from softprompt.runs.train import GenerateTask, run_train

    run, tasks, max_new_tokens = cfg.run, cfg.tasks, cfg.max_new_tokens
    steps, batch_size, dcfg = run.train.steps, run.train.batch_size, run.data
    device = str(next(model.parameters()).device)
    out.mkdir(parents=True, exist_ok=True)
    split_dir = out / "data"  # the training rows as plain {input, output} rows (chat-message rows: not yet)
    split_dir.mkdir(exist_ok=True)
    (split_dir / "train.jsonl").write_text("".join(json.dumps({"input": e.prompt, "output": e.target}) + "\n"
                                                   for e in train_ex))
    train_tok = None
    rows = []
    n = len(cfg.methods)
    for i, method in enumerate(cfg.methods, 1):
        mdir = out / method
        if method in PROMPT_METHODS:
            stage(i, n, f"{method}: training {steps} steps, then scoring {len(groups)} held-out inputs")
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                mrun = method_run(replace(run, train_data=str(split_dir / "train.jsonl"), eval_data=None,
                                          eval_fraction=0.0), method, mdir)
                res = run_train(mrun, model, tokenizer)
                train_s = time.perf_counter() - t0
            art = mdir / "last"
            prompt = load_artifact(art, model)
            eval_l = None
            if eval_tok:
                with torch.no_grad():
                    eval_l = eval_loss(prompt, model, eval_tok, batch_size, tokenizer.pad_token_id)
            with torch.no_grad():
                kv = prompt.to_kv_prefix(model)  # (L, 2, H_kv, P, D): what serving uses, compiled once
            scores = _decode_scores(model, tokenizer, groups, kv, cfg, mdir)
            trainable = GenerateTask().prompt(mrun, model, tokenizer, None).num_trainable_parameters()
            row = {"method": method, "trainable_parameters": trainable, "artifact_bytes": prompt.artifact_bytes(),
                   "train_s": train_s, "peak_memory_bytes": mem.bytes, "train_loss": res.train_loss,
                   "eval_loss": eval_l, **scores}
            if prompts is not None:
                # 16 distinct tasks: the trained prompt plus small perturbations (same cost as 16 trained ones)
                arts = [str(art)]
                for j in range(1, tasks):
                    t = {k: v + 1e-3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(j))
                         for k, v in prompt.export_tensors().items()}
                    arts.append(str(save_artifact(type(prompt).from_export(prompt.geometry, prompt.config_dict(), t),
                                                  mdir / "tasks" / f"t{j}.safetensors", model)))
                row.update(tokens_per_s_1_task=_engine_tps(model, tokenizer, arts[:1], prompts, max_new_tokens),
                           tokens_per_s_mixed=_engine_tps(model, tokenizer, arts, prompts, max_new_tokens),
                           inference="softprompt Engine")
            rows.append(row)
            continue
        if train_tok is None:
            train_tok = tokenize(train_ex, tokenizer, dcfg)
        if method == "lora":
            # PEFT modifies the model it wraps in place: it gets its own copy (the base stays bare)
            stage(i, n, f"lora (PEFT, r={cfg.lora_r}): training {steps} steps, then scoring")
            base = copy.deepcopy(model)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                pm, trainable, eval_l = _train_lora(base, tokenizer, train_tok, eval_tok, cfg, mdir)
                train_s = time.perf_counter() - t0
            lora_bytes = sum(t.numel() * t.element_size() for k, t in pm.state_dict().items() if "lora_" in k)
            # scored with the trained adapter active (the copy holds PEFT's LoRA layers): the same
            # decoding as the prompts, with no prefix
            scores = _decode_scores(base, tokenizer, groups, None, cfg, mdir)
            row = {"method": "lora", "trainable_parameters": trainable, "artifact_bytes": lora_bytes,
                   "train_s": train_s, "peak_memory_bytes": mem.bytes, "train_loss": None, "eval_loss": eval_l,
                   **scores}
            if prompts is not None:
                pm.load_adapter(str(mdir), adapter_name="a0")
                names = ["a0"]
                for j in range(1, tasks):
                    pm.load_adapter(str(mdir), adapter_name=f"a{j}")
                    names.append(f"a{j}")
                row.update(tokens_per_s_1_task=_peft_tps(pm, tokenizer, names[:1], prompts, max_new_tokens),
                           tokens_per_s_mixed=_peft_tps(pm, tokenizer, names, prompts, max_new_tokens),
                           inference="PEFT generate (adapter_names per row)")
            del pm, base
            rows.append(row)
            continue
        # full fine-tuning: every weight of a copy of the base, the prompt methods' loop and batches
        stage(i, n, f"full fine-tuning (every weight, lr {cfg.full_lr:g}): training {steps} steps, then scoring")
        with PeakMemory(device) as mem:  # the copy's weights, gradients and AdamW state: all of it counts
            t0 = time.perf_counter()
            tuned, trainable, eval_l, train_loss = train_full(model, tokenizer, train_tok, eval_tok, run,
                                                              cfg.full_lr, None, progress=run.output.progress)
            train_s = time.perf_counter() - t0
        tuned.save_pretrained(mdir / "model", safe_serialization=True)
        tokenizer.save_pretrained(mdir / "model")
        nbytes = sum(f.stat().st_size for f in (mdir / "model").glob("*.safetensors"))
        scores = _decode_scores(tuned, tokenizer, groups, None, cfg, mdir)
        row = {"method": "full", "trainable_parameters": trainable, "artifact_bytes": nbytes, "train_s": train_s,
               "peak_memory_bytes": mem.bytes, "train_loss": train_loss, "eval_loss": eval_l, **scores}
        if prompts is not None:
            row.update(tokens_per_s_1_task=_hf_tps(tuned, tokenizer, prompts, max_new_tokens),
                       tokens_per_s_mixed=None,
                       inference="transformers generate (a fine-tuned copy per task: no mixed batch)")
        del tuned
        rows.append(row)
    return rows


def _baseline(methods) -> str:
    return BASELINE if BASELINE in methods else methods[0]


def _bootstrap(rows: list[dict], refs: list[list[str]], n_samples: int, key: str = "predictions") -> None:
    """BLEU's 95% interval and p-value against the baseline for each row (in place), from sacrebleu's
    paired bootstrap over the rows' outputs `key` (aligned with `refs`)."""
    from softprompt.loops.evaluate import paired_bootstrap

    if not refs or not all(r.get(key) for r in rows):
        return
    base = _baseline([r["method"] for r in rows])
    res = paired_bootstrap({r["method"]: r[key] for r in rows}, refs, base, n_samples)
    sfx = "" if key == "predictions" else "_beam"
    for r in rows:
        b = res[r["method"]]
        r.update({f"bleu{sfx}_low": b["bleu_low"], f"bleu{sfx}_high": b["bleu_high"],
                  f"p_value{sfx}": b["p_value"]})


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("predictions")} for r in rows]


def _load(cfg: CompareConfig, model, tokenizer):
    """(model, tokenizer, training examples, held-out groups and their tokenized rows)."""
    from softprompt.loops.data import read_examples, split_heldout, tokenize
    from softprompt.runs.train import GenerateTask

    run = cfg.run
    if run.train_data is None:
        raise ValueError("--data is required (training data; same formats as train)")
    if model is None:
        from softprompt.runs.train import apply_model_config

        apply_model_config(run.model)
        model, tokenizer = GenerateTask().load(run, Dist())
    dcfg = run.data
    train_ex = read_examples(run.train_data, dcfg)
    if run.eval_data:
        eval_ex = read_examples(run.eval_data, dcfg)
    else:
        train_ex, eval_ex = split_heldout(train_ex, run.eval_fraction, run.train.seed)
    groups, eval_ex = _heldout(eval_ex, cfg.eval_inputs) if eval_ex else ([], [])
    eval_tok = tokenize(eval_ex, tokenizer, dcfg) if eval_ex else None
    return model, tokenizer, train_ex, groups, eval_tok


def _stage_printer(progress: bool, prefix: str = ""):
    def stage(i: int, n: int, what: str) -> None:
        if progress:
            print(f"compare {prefix}[{i}/{n}] {what}", file=sys.stderr, flush=True)

    return stage


def run_compare(cfg: CompareConfig, model=None, tokenizer=None) -> dict:
    """Train and measure every method; writes OUT/compare.{json,md,png} and returns the report.

    `eval_inputs`: held-out distinct inputs scored (0: all); `eval_max_new_tokens`: the longest
    output generated for BLEU/ROUGE-L (`max_new_tokens` is only for the tokens/s measurement).
    With `train_sizes`: the data-efficiency curve (`run_curve`).
    """
    if "lora" in cfg.methods:  # before any model loads: a missing extra is one line, not a traceback
        from softprompt.core.extras import require

        require("peft", "lora", "compare's LoRA row")
    if cfg.train_sizes:
        return run_curve(cfg, model, tokenizer)
    run = cfg.run
    out = Path(run.output.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, train_ex, groups, eval_tok = _load(cfg, model, tokenizer)
    device = str(next(model.parameters()).device)
    # distinct held-out inputs for the tokens/s rows too (E2E repeats each input ~8 times)
    prompts = [p if isinstance(p, str) else str(p) for p, _ in groups] or [
        ex.prompt if isinstance(ex.prompt, str) else str(ex.prompt) for ex in train_ex]
    prompts = (prompts * cfg.tasks)[:cfg.tasks]
    rows = _cell(cfg, model, tokenizer, train_ex, eval_tok, groups, out, prompts, _stage_printer(run.output.progress))
    refs = [r for _, r in groups]
    _bootstrap(rows, refs, cfg.bootstrap_samples)
    if cfg.num_beams > 1:
        _bootstrap(rows, refs, cfg.bootstrap_samples, "predictions_beam")
    report = {"data": str(run.train_data), "steps": run.train.steps, "batch_size": run.train.batch_size,
              "num_virtual_tokens": run.prompt.num_virtual_tokens, "lora_r": cfg.lora_r, "full_lr": cfg.full_lr,
              "tasks_mixed": cfg.tasks, "max_new_tokens": cfg.max_new_tokens, "device": device,
              "eval_inputs": len(groups), "eval_references": sum(len(r) for _, r in groups),
              "eval_max_new_tokens": cfg.eval_max_new_tokens, "num_beams": cfg.num_beams,
              "length_penalty": cfg.length_penalty, "baseline": _baseline(cfg.methods),
              "bootstrap_samples": cfg.bootstrap_samples,
              "metric": "eval_loss (held-out target cross-entropy; lower is better); BLEU and ROUGE-L (greedy, "
                        "all references of each held-out input; higher is better); BLEU's 95% interval and "
                        "p-value against the baseline from sacrebleu's paired bootstrap", "rows": _strip(rows)}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(markdown(report))
    chart(report, out / "compare.png")
    return report


def run_curve(cfg: CompareConfig, model=None, tokenizer=None) -> dict:
    """The data-efficiency curve: every method trained per training size and seed (the seed draws the
    subset and seeds the training), scored on the same held-out inputs; writes
    OUT/compare.{json,md,png} (the PNG: BLEU and ROUGE-L against size, a line and band per method) and
    each run under OUT/n{SIZE}/seed{SEED}/METHOD."""
    from softprompt.loops.data import subset_inputs

    run = cfg.run
    out = Path(run.output.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, train_ex, groups, eval_tok = _load(cfg, model, tokenizer)
    device = str(next(model.parameters()).device)
    seeds = cfg.seeds or (run.train.seed,)
    sizes = sorted(cfg.train_sizes)
    n_inputs = len(dict.fromkeys(e.prompt for e in train_ex))
    if sizes[-1] > n_inputs:
        print(f"compare: only {n_inputs} distinct training inputs; sizes above it train on all of them",
              file=sys.stderr)
    plan = {}
    for seed in seeds:
        for size in sizes:
            sub = subset_inputs(train_ex, size, seed)
            plan[size, seed] = (sub, steps_for(len(sub), cfg))
    print(f"compare: {len(sizes)} sizes x {len(seeds)} seeds x {len(cfg.methods)} methods; {steps_rule(cfg)}: "
          + ", ".join(f"{size} inputs ({len(plan[size, seeds[0]][0])} rows) -> {plan[size, seeds[0]][1]} steps"
                      for size in sizes), file=sys.stderr, flush=True)
    cells, k = [], 0
    for seed in seeds:
        for size in sizes:
            k += 1
            sub, steps = plan[size, seed]
            crun = replace(run, train=replace(run.train, seed=seed, steps=steps,
                                              warmup_steps=min(run.train.warmup_steps, steps)))
            ccfg = replace(cfg, run=crun, train_sizes=(), seeds=())
            stage = _stage_printer(run.output.progress, f"{size} inputs, seed {seed} ({k}/{len(plan)}) ")
            rows = _cell(ccfg, model, tokenizer, sub, eval_tok, groups, out / f"n{size}" / f"seed{seed}", None, stage)
            _bootstrap(rows, [r for _, r in groups], cfg.bootstrap_samples)
            for r in rows:
                r.update(size=size, seed=seed, steps=steps, train_rows=len(sub),
                         train_inputs=len(dict.fromkeys(e.prompt for e in sub)))
            cells += rows
    points = curve_points(cells, [r for _, r in groups], cfg)
    report = {"mode": "curve", "data": str(run.train_data), "train_sizes": sizes, "seeds": list(seeds),
              "methods": list(cfg.methods), "steps_rule": steps_rule(cfg), "batch_size": run.train.batch_size,
              "num_virtual_tokens": run.prompt.num_virtual_tokens, "lora_r": cfg.lora_r, "full_lr": cfg.full_lr,
              "device": device, "eval_inputs": len(groups), "eval_references": sum(len(r) for _, r in groups),
              "eval_max_new_tokens": cfg.eval_max_new_tokens, "num_beams": cfg.num_beams,
              "length_penalty": cfg.length_penalty, "baseline": _baseline(cfg.methods),
              "bootstrap_samples": cfg.bootstrap_samples,
              "intervals": "BLEU per point: corpus BLEU of the seeds' outputs pooled (every held-out input once "
                           "per seed), its 95% interval and p-value against the baseline from sacrebleu's paired "
                           "bootstrap (pairs: same seed, same input); mean and sd: over seeds",
              "points": points, "cells": _strip(cells)}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(curve_markdown(report))
    curve_chart(report, out / "compare.png")
    return report


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def curve_points(cells: list[dict], refs: list[list[str]], cfg: CompareConfig) -> list[dict]:
    """Per size and method: mean and sd over seeds of each score, and BLEU pooled over seeds with its
    paired-bootstrap interval and p-value against the baseline."""
    from softprompt.loops.evaluate import paired_bootstrap

    sizes = sorted({c["size"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    base = _baseline(cfg.methods)
    beams = [""] + (["_beam"] if cfg.num_beams > 1 else [])
    points = []
    for size in sizes:
        at = {(c["method"], c["seed"]): c for c in cells if c["size"] == size}
        pooled = {}
        for sfx in beams:
            key = "predictions" + sfx
            if refs and all(c.get(key) for c in at.values()):
                systems = {m: [h for s in seeds for h in at[m, s][key]] for m in cfg.methods}
                pooled[sfx] = paired_bootstrap(systems, refs * len(seeds), base, cfg.bootstrap_samples)
        for m in cfg.methods:
            cs = [at[m, s] for s in seeds]
            p = {"size": size, "method": m, "seeds": len(cs), "train_rows": cs[0]["train_rows"],
                 "steps": cs[0]["steps"]}
            for sfx in beams:
                for metric in ("bleu", "rouge_l"):
                    mean, sd = _mean_sd([c.get(metric + sfx) for c in cs])
                    p[f"{metric}{sfx}_mean"], p[f"{metric}{sfx}_sd"] = mean, sd
                    p[f"{metric}{sfx}_min"] = min((c.get(metric + sfx) for c in cs), default=None)
                    p[f"{metric}{sfx}_max"] = max((c.get(metric + sfx) for c in cs), default=None)
                if sfx in pooled:
                    b = pooled[sfx][m]
                    p.update({f"bleu{sfx}_pooled": b["bleu"], f"bleu{sfx}_low": b["bleu_low"],
                              f"bleu{sfx}_high": b["bleu_high"], f"p_value{sfx}": b["p_value"]})
            for key in ("eval_loss", "train_s"):
                p[f"{key}_mean"], p[f"{key}_sd"] = _mean_sd([c.get(key) for c in cs])
            p["peak_memory_bytes"] = max(c["peak_memory_bytes"] for c in cs)
            p["artifact_bytes"] = cs[0]["artifact_bytes"]
            p["trainable_parameters"] = cs[0]["trainable_parameters"]
            points.append(p)
    return points


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _p(v) -> str:
    return "-" if v is None else f"{v:.4f}"



def _decoding(report: dict, beams: bool) -> str:
    """How the table's outputs were decoded, for the line under it."""
    return "greedy" + (f", and beam search ({report['num_beams']} beams, length penalty "
                       f"{report['length_penalty']:g})" if beams else "")

def curve_markdown(report: dict) -> str:
    base, beams = report["baseline"], report["num_beams"] > 1
    head = ("| method | train inputs | rows | steps | BLEU mean ± sd | BLEU pooled [95% interval] | p vs "
            f"{base} | ROUGE-L mean ± sd |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if beams:
        head += f" BLEU beam {report['num_beams']} pooled [95% interval] | p vs {base} (beam) | ROUGE-L beam mean |"
        sep += "---:|---:|---:|"
    head += " eval_loss | train s | peak memory MB | artifact bytes |"
    sep += "---:|---:|---:|---:|"
    lines = [head, sep]
    for p in report["points"]:
        ms = lambda k: "-" if p.get(k + "_mean") is None else \
            f"{p[k + '_mean']:.1f} ± {p[k + '_sd']:.1f}"  # noqa: E731
        iv = lambda s: "-" if p.get(f"bleu{s}_pooled") is None else \
            f"{p[f'bleu{s}_pooled']:.1f} [{p[f'bleu{s}_low']:.1f}, {p[f'bleu{s}_high']:.1f}]"  # noqa: E731
        line = (f"| {p['method']} | {p['size']} | {p['train_rows']} | {p['steps']} | {ms('bleu')} | {iv('')} | "
                f"{_p(p.get('p_value'))} | {ms('rouge_l')} |")
        if beams:
            line += f" {iv('_beam')} | {_p(p.get('p_value_beam'))} | {_fmt(p.get('rouge_l_beam_mean'), '.1f')} |"
        line += (f" {_fmt(p['eval_loss_mean'], '.4f')} | {p['train_s_mean']:.1f} | "
                 f"{p['peak_memory_bytes'] / 2**20:.0f} | {p['artifact_bytes']:,} |")
        lines.append(line)
    lines.append("")
    decoding = _decoding(report, beams)
    lines.append(f"Data-efficiency curve on {report['data']}: per seed ({', '.join(map(str, report['seeds']))}) a "
                 f"subset of each size of distinct training inputs (each with all its rows; the smaller inside the "
                 f"larger) is drawn and every method trained on it, batch {report['batch_size']}, "
                 f"{report['steps_rule']}. P = {report['num_virtual_tokens']}, LoRA r = {report['lora_r']} (q_proj, "
                 f"v_proj), full fine-tuning at lr {report['full_lr']:g}. Scored on the same "
                 f"{report['eval_inputs']} held-out inputs ({report['eval_references']} references), {decoding}, at "
                 f"most {report['eval_max_new_tokens']} new tokens. {report['intervals']}; "
                 f"{report['bootstrap_samples']} resamples. Device {report['device']}.")
    return "\n".join(lines) + "\n"


COLORS = {"prefix_tuning": "tab:blue", "prompt_tuning": "tab:orange", "p_tuning": "tab:purple", "lora": "tab:green",
          "full": "tab:red"}


def curve_chart(report: dict, path: Path) -> Path:
    """BLEU and ROUGE-L against training size (log axis): a line (mean over seeds) and a band (± one sd
    over seeds) per method; BLEU's pooled 95% bootstrap interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in zip(axes, ("bleu", "rouge_l"), ("BLEU", "ROUGE-L")):
        for m in report["methods"]:
            pts = [p for p in report["points"] if p["method"] == m and p.get(f"{metric}_mean") is not None]
            if not pts:
                continue
            x = [p["size"] for p in pts]
            y = [p[f"{metric}_mean"] for p in pts]
            sd = [p[f"{metric}_sd"] for p in pts]
            c = COLORS.get(m)
            ax.plot(x, y, "o-", color=c, label=m)
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], color=c, alpha=0.18)
            if metric == "bleu" and all(p.get("bleu_low") is not None for p in pts):
                ax.errorbar(x, [p["bleu_pooled"] for p in pts],
                            yerr=[[p["bleu_pooled"] - p["bleu_low"] for p in pts],
                                  [p["bleu_high"] - p["bleu_pooled"] for p in pts]],
                            fmt="none", ecolor=c, alpha=0.6, capsize=3)
        ax.set_xscale("log")
        ax.set_xticks(report["train_sizes"], [str(s) for s in report["train_sizes"]])
        ax.minorticks_off()
        ax.set_xlabel("training inputs (distinct)")
        ax.set_title(f"held-out {title} (mean over {len(report['seeds'])} seed(s), band ± sd)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(left=0.06, right=0.98, top=0.9, bottom=0.13, wspace=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(report: dict) -> str:
    n, base, beams = report["tasks_mixed"], report.get("baseline", BASELINE), report.get("num_beams", 1) > 1
    head = (f"| method | trainable params | artifact bytes | train s | peak memory MB | tok/s 1 task | tok/s {n} tasks "
            f"mixed | eval_loss | BLEU | ROUGE-L | BLEU 95% interval | p vs {base} |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if beams:
        head += f" BLEU beam {report['num_beams']} | ROUGE-L beam | BLEU beam 95% interval | p vs {base} (beam) |"
        sep += "---:|---:|---:|---:|"
    lines = [head, sep]
    iv = lambda r, s="": "-" if r.get(f"bleu{s}_low") is None else \
        f"[{r[f'bleu{s}_low']:.1f}, {r[f'bleu{s}_high']:.1f}]"  # noqa: E731
    for r in report["rows"]:
        line = (f"| {r['method']} | {r['trainable_parameters']:,} | {r['artifact_bytes']:,} | {r['train_s']:.1f} | "
                f"{r['peak_memory_bytes'] / 2**20:.0f} | {_fmt(r.get('tokens_per_s_1_task'), '.1f')} | "
                f"{_fmt(r.get('tokens_per_s_mixed'), '.1f')} | {_fmt(r['eval_loss'], '.4f')} | "
                f"{_fmt(r.get('bleu'), '.1f')} | {_fmt(r.get('rouge_l'), '.1f')} | {iv(r)} | {_p(r.get('p_value'))} |")
        if beams:
            line += (f" {_fmt(r.get('bleu_beam'), '.1f')} | {_fmt(r.get('rouge_l_beam'), '.1f')} | {iv(r, '_beam')} | "
                     f"{_p(r.get('p_value_beam'))} |")
        lines.append(line)
    lines.append("")
    decoding = _decoding(report, beams)
    lines.append(f"{report['steps']} steps x batch {report['batch_size']} each, P = {report['num_virtual_tokens']}, "
                 f"LoRA r = {report['lora_r']} (q_proj, v_proj), full fine-tuning at lr {report.get('full_lr', 0):g}; "
                 f"{report['max_new_tokens']} new tokens per row, {n} rows; device {report['device']}. Inference: "
                 "prompts through the softprompt engine, LoRA through PEFT generate with per-row adapter_names, full "
                 "fine-tuning through transformers generate (one task: a copy of the model per task, no mixed batch). "
                 f"eval_loss, BLEU and ROUGE-L on the same {report.get('eval_inputs', 0)} held-out inputs "
                 f"({report.get('eval_references', 0)} references): {decoding}, at most "
                 f"{report.get('eval_max_new_tokens', 0)} new tokens, cut at the first newline. BLEU's 95% interval "
                 f"and the p-value against {base}: sacrebleu's paired bootstrap "
                 f"({report.get('bootstrap_samples', 0)} resamples).")
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
        ax.bar(names, vals, color=[COLORS.get(n, "tab:gray") for n in names])
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    # fixed margins: tight_layout renders the figure once more just to measure it (~2x the time)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.96, bottom=0.08, wspace=0.35, hspace=0.55)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
