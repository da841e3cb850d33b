"""The one training pipeline, `run_train(cfg)`, from a `RunConfig` (runs/config.py): what
`softprompt train` (both tasks), `sp.train`, `softprompt compare` and the demo all call; and the
job behind `softprompt eval`. data -> model -> loop -> artifact.

A task (generation here, classification in runs/classify.py) says how the base loads, how rows
become training data, what prompt is created and what the loop optimizes; the rest (the run
directory, the learning rate, trackers, run.json, resuming, the loop) is the same for every task.
Library code (data.py, train.py, evaluate.py) stays free of printing and argument handling.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

RUN_FILES = ("best", "last", "checkpoints", "metrics.jsonl", "run.json", "plot.png")


def _say(msg: str, main: bool = True) -> None:
    if main:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """A task's training data, ready for the loop."""

    train: object  # TokenizedData (or a task's own kind)
    eval: object = None
    groups: list | None = None  # distinct held-out inputs with all their references (generation)
    objective: object = None  # what the loop optimizes (None: the causal LM's target loss)
    facts: dict | None = None  # what the run learned, for run.json (bad rows, the template used, ...)
    note: str = ""  # the data line the run prints
    card: dict | None = None  # fields every artifact's card carries (how the inputs were formatted)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """A run directory that holds anything is refused unless resume (continue it) or overwrite
    (remove the earlier run's own files; other files are left alone)."""
    import shutil

    if resume or not out.is_dir() or not any(out.iterdir()):
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file; a training run needs a directory")
        return
    if not overwrite:
        raise ValueError(f"{out} already holds files; pass --resume to continue its run, --overwrite to start "
                         "afresh there (the earlier run's artifacts are removed), or choose a new OUT")
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def apply_model_config(mc) -> None:
    """Where the base runs (device, dtype, quantize, threads) for every loader below this run."""
    from softprompt.core.device import set_defaults, set_threads

    set_defaults(mc.device, mc.dtype, mc.quantize)
    set_threads(mc.threads)


class GenerateTask:
    """Generation on a decoder or an encoder-decoder: the family tokenizes, creates and scores."""

    def load(self, cfg, dist):
        from softprompt.io.lora import load_base_with_lora

        if cfg.model.base is None:
            _say("loading the embedded SmolLM2-135M-Instruct ...", dist.main)
        model, tokenizer = load_base_with_lora(cfg.model.base, cfg.model.lora, merge=cfg.model.merge_lora)
        if dist.world > 1 and _cuda():
            import torch

            torch.cuda.set_device(dist.rank % torch.cuda.device_count())
            model.to(f"cuda:{dist.rank % torch.cuda.device_count()}")
        return model, tokenizer

    def data(self, cfg, model, tokenizer, rows=None, eval_rows=None) -> Prepared:
        from softprompt.families import family_of
        from softprompt.loops.data import BadRows, group_references, split_heldout

        bad, dcfg = BadRows(), cfg.data
        train_ex = examples(rows if rows is not None else cfg.train_data, dcfg, bad)
        eval_ex = None
        if eval_rows is not None or cfg.eval_data:
            eval_ex = examples(eval_rows if eval_rows is not None else cfg.eval_data, replace(dcfg, max_rows=0), bad)
        elif cfg.eval_fraction > 0:
            train_ex, eval_ex = split_heldout(train_ex, cfg.eval_fraction, cfg.train.seed)
        family = family_of(model)  # how this base tokenizes, trains and creates prompts
        train_tok = family.tokenize(train_ex, tokenizer, dcfg, bad)
        eval_tok = family.tokenize(eval_ex, tokenizer, dcfg, bad) if eval_ex else None
        groups = group_references(eval_tok.examples) if eval_tok else None
        note = (f"data: {len(train_tok)} training rows, {len(eval_tok) if eval_tok else 0} held-out rows"
                f" ({len(groups) if groups else 0} distinct inputs); {bad.report()}")
        fmt = prompt_format(train_tok.examples, tokenizer, dcfg)
        return Prepared(train_tok, eval_tok, groups, family.objective(), {"bad_rows": bad.count}, note,
                        {"prompt_format": fmt} if fmt is not None else None)

    def prompt(self, cfg, model, tokenizer, prepared):
        from dataclasses import asdict

        from softprompt.families import family_of

        options = {k: v for k, v in asdict(cfg.prompt).items() if v is not None}
        return family_of(model).create(cfg.method, model, tokenizer, **options)

    def lr(self, cfg, prompt) -> float:
        return cfg.prompt.default_lr()

    def metric(self, cfg, prepared) -> str:
        return cfg.train.metric


def prompt_format(examples, tokenizer, dcfg) -> dict | None:
    """How the training prompts were formatted, for the card (serve/prompt_format.py applies it to
    requests): `chat_template` (wrapped in the base's chat template: --chat-template, or rows of chat
    messages, which loops/data.render_prompt always renders with the template), the row-field
    `template` (for people reading the card), and the `system_prompt` every chat row began with.

    None (the card then records nothing, and the format is unknown, as for cards from before this
    was recorded) where no rule could reproduce the text: chat rows on a tokenizer without a chat
    template (rendered as `role: content` lines), or chat rows mixed with plain rows that were not
    wrapped in the template."""
    chats = [json.loads(ex.prompt[1]) for ex in examples if isinstance(ex.prompt, tuple)]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chats and (not has_template or (len(chats) < len(examples) and not dcfg.chat_template)):
        return None
    systems = {m[0].get("content") if isinstance(m[0], dict) and m[0].get("role") == "system" else None
               for m in chats}
    system = systems.pop() if len(systems) == 1 and len(chats) == len(examples) else None
    return {"chat_template": bool(chats) or (dcfg.chat_template and has_template), "template": dcfg.template,
            "system_prompt": system if isinstance(system, str) else None}


def examples(data, dcfg, bad=None):
    """Examples from a path (JSONL, CSV/TSV, hf:NAME) or from rows (a list of dicts, a datasets.Dataset)."""
    from collections.abc import Iterable

    from softprompt.loops.data import read_examples, row_to_example

    if isinstance(data, (str, os.PathLike)):
        return read_examples(data, dcfg, bad)
    if data is None:
        raise ValueError("no training data: pass DATA (a .jsonl, .csv/.tsv file or hf:NAME)")
    if isinstance(data, dict) or not isinstance(data, Iterable):
        raise TypeError("data must be a path, a list of dicts or a datasets.Dataset")
    return [row_to_example(dict(row), dcfg, f"row {i + 1}") for i, row in enumerate(data)]


def run_train(cfg, model=None, tokenizer=None, *, prompt=None, rows=None, eval_rows=None):
    """Train and save per `cfg` (a RunConfig); returns the `TrainResult`.

    `model`/`tokenizer`: skip loading (tests, the demo, the Python API). `prompt`: train this prompt
    in place instead of creating one (`sp.train`). `rows`/`eval_rows`: in-memory rows instead of
    `cfg.train_data`/`cfg.eval_data`. Without `cfg.output.out` nothing is written and nothing printed.
    """
    from softprompt.io.artifact import save_artifact
    from softprompt.loops.tracking import Reporters, parse_report_to
    from softprompt.loops.train import Trainer, TrainerOutput, init_distributed

    parse_report_to(list(cfg.output.report_to) or None)  # a bad name fails before the data and the model load
    dist = init_distributed()
    out = Path(cfg.output.out) if cfg.output.out is not None else None
    say = dist.main and out is not None
    if out is not None and dist.main:
        prepare_run_dir(out, cfg.output.resume, cfg.output.overwrite)
    if dist.world > 1:  # every process has checked before any of them writes
        import torch.distributed

        torch.distributed.barrier()
    if cfg.task == "classify":
        from softprompt.runs.classify import ClassifyTask

        task = ClassifyTask()
    else:
        task = GenerateTask()
    if model is None:
        apply_model_config(cfg.model)
        model, tokenizer = task.load(cfg, dist)
    prepared = task.data(cfg, model, tokenizer, rows, eval_rows)
    _say(prepared.note, say)
    if prompt is None:
        prompt = task.prompt(cfg, model, tokenizer, prepared)
    prompt.to(next(model.parameters()).device)
    train_cfg = replace(cfg.train, lr=cfg.train.lr if cfg.train.lr is not None else task.lr(cfg, prompt),
                        metric=task.metric(cfg, prepared))
    cfg = replace(cfg, train=train_cfg)
    run_json = {**cfg.to_dict(), **(prepared.facts or {}), "world": dist.world}
    run_json = json.loads(json.dumps(run_json, default=str))
    reporter = Reporters(list(cfg.output.report_to) or None, out, run_json) if dist.main and out is not None else None
    card = {"dataset": str(cfg.train_data)} if cfg.train_data else None
    # the loop passes on only the dataset; the task's own card fields ride with the save call
    save = partial(save_with, prepared.card) if prepared.card else save_artifact
    trainer = Trainer(model, tokenizer, prompt, prepared.train, train_cfg, prepared.eval, prepared.groups,
                      prepared.objective, TrainerOutput(out, save, card, reporter or None,
                                                        cfg.output.progress, dist))
    if cfg.output.resume and out is not None:
        if trainer.resume():
            _say(f"resumed from step {trainer.step}", say)
        else:
            _say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0", say)
    if out is not None and dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(run_json, indent=2))
    t0 = time.perf_counter()
    try:
        result = trainer.run()
    except BaseException:
        if reporter:
            reporter.close(None, failed=True)
        raise
    if out is not None and dist.main and cfg.task != "classify":
        write_offtask(out / "best", model, prepared, say)
    if reporter:
        reporter.close(out / "best")
    if say:
        best = ", ".join(f"{k}={v:.4g}" for k, v in (result.best or {}).items() if isinstance(v, float))
        _say(f"done: {result.step} steps in {time.perf_counter() - t0:.0f} s ({result.stopped}); "
             f"last train loss {result.train_loss:.4f}{'; best ' + best if best else ''}\n"
             f"artifact: {out / 'best'} (last step: {out / 'last'}); metrics: {out / 'metrics.jsonl'}; "
             f"plot: {out / 'plot.png'}")
    return result


OFFTASK_FIT_ROWS, OFFTASK_HELDOUT_ROWS = 2048, 512  # distinct prompts: enough for k=16 directions, seconds on a CPU


def write_offtask(artifact: Path, model, prepared: Prepared, say: bool = False) -> Path | None:
    """Write the off-task guard's summary (core/offtask.py) of the run's training prompts beside its
    best artifact, calibrated on the held-out prompts (every fifth training prompt without a held-out
    split); the card names it, so `softprompt serve` and the store find it. Only for a prefix the
    decoder engine serves (the guard reads its prefill); `last` gets none (`sp.offtask_summary` makes
    one for any artifact). A failure here is reported and leaves the artifact as it was: the run's
    result is not lost to its guard."""
    import random

    from softprompt.io.artifact import load_artifact
    from softprompt.io.offtask import write_summary
    from softprompt.loops.offtask import prompt_kv, summarize
    from softprompt.methods.base import KVPrefix

    def prompts(data, cap: int) -> list[list[int]] | None:
        if data is None or not hasattr(data, "n_target"):
            return None
        seen = {tuple(ids[:len(ids) - n]): None for ids, n in zip(data.ids, data.n_target)}  # distinct, in order
        rows = [list(r) for r in seen if r]
        return random.Random(0).sample(rows, cap) if len(rows) > cap else rows

    try:
        if not artifact.exists():
            return None
        prompt = load_artifact(artifact, model)
        prefix = prompt.to_kv_prefix(model)
        rows = prompts(prepared.train, OFFTASK_FIT_ROWS)
        if not isinstance(prefix, KVPrefix) or not rows or len(rows) < 3:
            return None
        summary = summarize(model, rows, prompt_kv(model, prefix), heldout=prompts(prepared.eval, OFFTASK_HELDOUT_ROWS))
        path = write_summary(artifact, summary)
    except Exception as e:  # noqa: BLE001
        _say(f"off-task summary not written ({type(e).__name__}: {e})", say)
        return None
    _say(f"off-task summary: {path} (layer {summary.layer}, k {summary.k}, threshold {summary.threshold:.3g} "
         f"from {summary.meta['n_heldout']} held-out prompts)", say)
    return path


def save_with(fields: dict, prompt, path, model, *, extra=None, **options):
    """save_artifact with `fields` added to the card (what the run knows and the loop does not)."""
    from softprompt.io.artifact import save_artifact

    return save_artifact(prompt, path, model, extra={**fields, **(extra or {})}, **options)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_eval(cfg, model=None, tokenizer=None):
    """Generate for every distinct input and score it against all its references, per `cfg` (an
    EvalConfig, runs/config.py); returns the metrics.

    `cfg.model.lora`: a PEFT LoRA adapter applied to the base first (merged unless `merge_lora` is
    False), for prompts trained on that adapted model; a prompt trained on the bare base is then
    refused by its fingerprint (and one trained with LoRA is refused without it), with a hint naming
    the flag. `model`/`tokenizer` skip loading (tests); the LoRA adapter is applied to a given model
    too, in place.
    """
    from softprompt.families import family_of
    from softprompt.io.lora import apply_lora, load_base_with_lora, load_prompt
    from softprompt.loops.data import BadRows, group_references, read_examples

    if not cfg.eval_data:
        raise ValueError("--data PATH is required")
    m, bad = cfg.model, BadRows()
    dcfg = replace(cfg.rows, max_length=10**9)  # every row is scored, whatever its length
    groups = group_references(read_examples(cfg.eval_data, dcfg, bad))
    if cfg.max_inputs:
        groups = groups[:cfg.max_inputs]
    if model is None:
        if m.base is None:
            _say("loading the embedded SmolLM2-135M-Instruct ...")
        model, tokenizer = load_base_with_lora(m.base, m.lora, merge=m.merge_lora)
    elif m.lora is not None:
        model = apply_lora(model, m.lora, merge=m.merge_lora)
    kv = None
    if cfg.adapter and cfg.adapter != "none":
        kv = load_prompt(cfg.adapter, model, m.lora, m.merge_lora, cfg.allow_other_base).to_kv_prefix(model)
    t0 = time.perf_counter()
    res = family_of(model).evaluate_groups(model, tokenizer, groups, kv, chat_template=dcfg.chat_template,
                                           max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                                           batch_size=cfg.batch_size)
    preds = res.pop("predictions")
    res["seconds"] = time.perf_counter() - t0
    res["references"] = sum(len(r) for _, r in groups)
    rows = ({"prompt": p if isinstance(p, str) else p[1], "output": h, "references": refs}
            for (p, refs), h in zip(groups, preds))
    decoding = "greedy" if cfg.num_beams == 1 else f"beam {cfg.num_beams}"
    return report_eval(cfg, res, rows, bad,
                       f"{res['n']} inputs ({res['references']} references), {decoding}: BLEU {res['bleu']:.2f}  "
                       f"ROUGE-L {res['rouge_l']:.2f}  exact match {res['exact_match']:.1f}%  "
                       f"accuracy {res['accuracy']:.1f}%  ({res['seconds']:.0f} s)")


def report_eval(cfg, res: dict, rows, bad, line: str) -> dict:
    """How an eval job ends (generation here, classification in runs/classify.py): one JSON line per
    input in `cfg.predictions`, the bad rows counted, the metrics printed (JSON with `cfg.json`, else `line`)."""
    if cfg.predictions:
        with open(cfg.predictions, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    if bad.count:
        _say(bad.report())
    print(json.dumps(res, indent=2) if cfg.json else line)
    return res
