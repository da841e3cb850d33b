"""The public Python API in PEFT's idiom, exported from the package root (its docstring shows the
whole workflow, and tests/test_api.py runs it). Defaults are the command line's (softprompt/core/defaults.py
and the config dataclasses are the one source). Every model family takes the same calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields

from softprompt.families import family_of
from softprompt.io.artifact import save_artifact
from softprompt.methods import CONFIGS, PromptMethod
from softprompt.runs.config import GenerateConfig


def create(model, config, tokenizer=None) -> PromptMethod:
    """A new prompt for `model` from a method config (`PrefixTuningConfig`, `PromptTuningConfig`,
    `PTuningConfig`). With a tokenizer, prefix and prompt tuning start from text (config.py). A
    config's `task_type` (PEFT's, e.g. "CAUSAL_LM") is checked against the model (ValueError)."""
    method = next((name for name, cls in CONFIGS.items() if isinstance(config, cls)), None)
    if method is None:
        raise TypeError(f"expected a PrefixTuningConfig, PromptTuningConfig or PTuningConfig, got {type(config).__name__}")
    family = family_of(model)
    check_task_type(getattr(config, "task_type", None), family)
    options = {f.name: getattr(config, f.name) for f in fields(config) if getattr(config, f.name) is not None}
    prompt = family.create(method, model, tokenizer, **options)
    prompt.attach_base(model, save_artifact)
    return prompt


# Classification prompts (softprompt/runs/classify.py) are trained on any family.
ANY_FAMILY_TASK_TYPES = ("SEQ_CLS",)


def task_types(family) -> tuple[str, ...]:
    """PEFT's task types a prompt for a model of `family` may declare."""
    return tuple(family.peft_task_types) + ANY_FAMILY_TASK_TYPES


def check_task_type(task_type: str | None, family) -> None:
    """A config's `task_type` (None: the model's own) must fit the model: one line otherwise."""
    if task_type is not None and task_type not in task_types(family):
        raise ValueError(f"task_type {task_type!r} does not fit this {family.description} model: use "
                         f"{' or '.join(map(repr, task_types(family)))}, or leave task_type out")


def train(prompt: PromptMethod, model, tokenizer, data, *, eval_data=None, out: str | os.PathLike | None = None,
          template: str | None = None, target: str | None = None, chat_template: bool = False, **options):
    """Train `prompt` on `data` in place; returns the `TrainResult` (loss history, best evaluation).

    data, eval_data: a JSONL/CSV/TSV path, a list of dicts ({"input", "output"}, {"prompt",
    "completion"}, chat "messages", or any fields with `template`/`target`), or a datasets.Dataset.
    options: `TrainConfig` fields (steps, batch_size, lr, schedule, ...), and `max_length`,
    `progress`: the CLI's defaults (the same RunConfig, the same pipeline: runs/train.py).
    `out`: also write checkpoints, metrics.jsonl, run.json and the best/last artifacts there.
    """
    from softprompt.runs.config import RunConfig
    from softprompt.runs.train import run_train

    paths = {k: os.fspath(v) for k, v in (("train_data", data), ("eval_data", eval_data))
             if isinstance(v, (str, os.PathLike))}
    cfg = RunConfig.of(**paths, template=template, target=target, chat_template=chat_template,
                       out=None if out is None else os.fspath(out), method=prompt.method, **options)
    return run_train(cfg, model, tokenizer, prompt=prompt, rows=None if "train_data" in paths else data,
                     eval_rows=None if eval_data is None or "eval_data" in paths else eval_data)


def generate(model, tokenizer, prompts: str | Sequence[str], prompt: PromptMethod | None = None, *,
             max_new_tokens: int = GenerateConfig.max_new_tokens, **sampling) -> list[str]:
    """Continuations of `prompts` under `prompt` (or the bare model); `sampling`: the other
    `SamplingParams` fields (temperature=0 for greedy, top_k, top_p, seed, stop). `max_new_tokens`
    defaults to `softprompt generate`'s (GenerateConfig's: one default for both)."""
    from softprompt.loops.generate import SamplingParams

    prefix = None if prompt is None else prompt.to_kv_prefix(model)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
    return family_of(model).generate(model, tokenizer, texts, prefix, params)


def load(path: str | os.PathLike, model, *, allow_other_base: bool = False) -> PromptMethod:
    """A saved prompt (our artifact or a PEFT adapter directory), checked against `model`'s weights."""
    from softprompt.io.artifact import load_artifact

    prompt = load_artifact(path, model, allow_other_base=allow_other_base)
    prompt.attach_base(model, save_artifact)
    return prompt


def offtask_summary(model, tokenizer, texts, prompt: PromptMethod | None = None, *, heldout=None,
                    save_to: str | os.PathLike | None = None, **options):
    """The off-task guard's summary of a task's input texts under `prompt` (softprompt/loops/offtask.py),
    for any artifact and its data: `heldout` texts of the same task calibrate the threshold (default:
    every fifth text, never fitted); `save_to`: the prompt's artifact, beside which it is written and
    whose card then names it (what `softprompt serve` reads). options: layer, k, quantile."""
    from softprompt.io.offtask import write_summary
    from softprompt.loops.offtask import offtask_summary as summarize

    summary = summarize(model, tokenizer, texts, prompt, heldout=heldout, **options)
    if save_to is not None:
        write_summary(save_to, summary)
    return summary
