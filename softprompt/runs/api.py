"""The public Python API in PEFT's idiom, exported from the package root (its docstring shows the
whole workflow, and tests/test_api.py runs it). Defaults are the command line's (softprompt/core/defaults.py
and the config dataclasses are the one source). Every model family takes the same calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import fields

from softprompt.families import family_of
from softprompt.io.artifact import save_artifact
from softprompt.methods import CONFIGS, PromptMethod


def create(model, config, tokenizer=None) -> PromptMethod:
    """A new prompt for `model` from a method config (`PrefixTuningConfig`, `PromptTuningConfig`,
    `PTuningConfig`). With a tokenizer, prefix and prompt tuning start from text (config.py)."""
    method = next((name for name, cls in CONFIGS.items() if isinstance(config, cls)), None)
    if method is None:
        raise TypeError(f"expected a PrefixTuningConfig, PromptTuningConfig or PTuningConfig, got {type(config).__name__}")
    options = {f.name: getattr(config, f.name) for f in fields(config) if getattr(config, f.name) is not None}
    prompt = family_of(model).create(method, model, tokenizer, **options)
    prompt.attach_base(model, save_artifact)
    return prompt


def _examples(data, template: str | None, target: str | None, chat_template: bool, max_length: int):
    from softprompt.loops.data import DataConfig, read_examples, row_to_example

    cfg = DataConfig(template=template, target=target, chat_template=chat_template, max_length=max_length)
    if isinstance(data, (str, os.PathLike)):
        return read_examples(data, cfg), cfg
    if isinstance(data, dict) or not isinstance(data, Iterable):
        raise TypeError("data must be a path, a list of dicts or a datasets.Dataset")
    return [row_to_example(dict(row), cfg, f"row {i + 1}") for i, row in enumerate(data)], cfg


def train(prompt: PromptMethod, model, tokenizer, data, *, eval_data=None, out: str | os.PathLike | None = None,
          template: str | None = None, target: str | None = None, chat_template: bool = False, max_length: int = 512,
          progress: bool = True, **options):
    """Train `prompt` on `data` in place; returns the `TrainResult` (loss history, best evaluation).

    data, eval_data: a JSONL/CSV/TSV path, a list of dicts ({"input", "output"}, {"prompt",
    "completion"}, chat "messages", or any fields with `template`/`target`), or a datasets.Dataset.
    options: `TrainConfig` fields (steps, batch_size, lr, schedule, ...), the CLI's defaults.
    `out`: also write checkpoints, metrics.jsonl and the best/last artifacts there.
    """
    from softprompt.loops.data import group_references
    from softprompt.loops.train import TrainConfig, Trainer

    cfg = TrainConfig(**options)
    train_ex, dcfg = _examples(data, template, target, chat_template, max_length)
    family = family_of(model)
    objective, tok_fn = family.objective(), family.tokenize
    train_tok = tok_fn(train_ex, tokenizer, dcfg)
    eval_tok = groups = None
    if eval_data is not None:
        eval_tok = tok_fn(_examples(eval_data, template, target, chat_template, max_length)[0], tokenizer, dcfg)
        groups = group_references(eval_tok.examples)
    prompt.to(next(model.parameters()).device)
    trainer = Trainer(model, tokenizer, prompt, train_tok, cfg, out=out, save=save_artifact, eval_data=eval_tok,
                      eval_groups=groups,
                      progress=progress, objective=objective)
    return trainer.run()


def generate(model, tokenizer, prompts: str | Sequence[str], prompt: PromptMethod | None = None, **sampling) -> list[str]:
    """Continuations of `prompts` under `prompt` (or the bare model); `sampling`: `SamplingParams`
    fields (max_new_tokens=32, temperature=0 for greedy, top_k, top_p, seed, stop)."""
    from softprompt.loops.generate import SamplingParams

    prefix = None if prompt is None else prompt.to_kv_prefix(model)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    return family_of(model).generate(model, tokenizer, texts, prefix, SamplingParams(**sampling))


def load(path: str | os.PathLike, model, *, allow_other_base: bool = False) -> PromptMethod:
    """A saved prompt (our artifact or a PEFT adapter directory), checked against `model`'s weights."""
    from softprompt.io.artifact import load_artifact

    prompt = load_artifact(path, model, allow_other_base=allow_other_base)
    prompt.attach_base(model, save_artifact)
    return prompt
