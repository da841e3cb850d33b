"""The configs of `distill` and `compile_text` (runs/distill.py): frozen dataclasses, torch-free (the
command line builds its parser from them before anything heavy loads), like runs/config.py's.
Each default is written once, here; `sp.distill(...)` builds a `DistillConfig` from its keywords."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from softprompt.core.defaults import ModelConfig, config_of
from softprompt.loops.config import TrainConfig

# Where the student's prefix starts (docs/distill.md): the long prompt's own compiled K/V at its
# first P positions ("prompt") or at P evenly spaced ones ("spaced"), P random tokens' K/V
# ("vocab"), or N(0, 1) entries ("random", PEFT's default).
DISTILL_INITS = ("prompt", "spaced", "vocab", "random")
SELF_STUDY_PROMPT = "Write one example of an input these instructions could receive. Reply with the input only."


def _stop(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class CompileTextConfig:
    """Compile a long prompt into a KV-prefix artifact, exactly and with no training.

    P is the prompt's token count; serving the artifact gives the logits of the prompt written out
    before each request, without reading it again per request.

    Args:
        prompt_file: a text file holding the prompt (UTF-8), compiled as written
        out: the artifact to write (a directory, or a .safetensors file)
        chat: the prompt is a system prompt: compile the chat template's system turn
        overwrite: replace an artifact already at OUT (refused by default)
        base: a local HuggingFace model directory (default: the embedded model)
    """

    prompt_file: str | None = None
    out: str | None = None
    chat: bool = False
    overwrite: bool = False
    model: ModelConfig = ModelConfig()
    OPTIONS: typing.ClassVar = ("chat", "overwrite", "model.base", "model.device", "model.dtype", "model.threads")
    FLAG_NAMES: typing.ClassVar = {}
    POSITIONAL: typing.ClassVar = ("prompt_file", "out")

    @classmethod
    def of(cls, **options) -> "CompileTextConfig":
        return config_of(cls, options)


@dataclass(frozen=True)
class DistillConfig:
    """Distill a long prompt into a few virtual tokens, with no labels needed.

    Trains a prefix so that the model with it continues inputs as the model with the whole prompt
    does (KL to the teacher's top-k), on given inputs or ones the model writes itself (self-study).

    Args:
        prompt_file: a text file holding the long prompt (UTF-8); the Python API takes the text itself
        out: the run directory (student artifacts best/ and last/, distill.json, distill.md, distill.png)
        inputs: unlabelled inputs: .jsonl ("input" or "prompt" field; "output"/"completion" labels are scored
            if present), .csv/.tsv with an input column, or .txt (one per line); none: self-study
        input_field: the inputs file's field (column) holding the input (default: input, else prompt)
        label_field: its field holding a label, if any (default: output, else completion)
        chat: the prompt is a system prompt and inputs are user turns, in the base's chat template
        template: how an input becomes the request text after the prompt ("{input}" marks its place)
        num_virtual_tokens: the student's prefix length P
        init: where the student starts: prompt (the prompt's first P compiled positions), spaced, vocab, random
        projection_dim: 0 trains the prefix directly; above 0 through an MLP of this width (training only)
        steps: optimizer steps
        batch_size: inputs per step
        lr: learning rate (default: prefix tuning's, 5e-3 direct, 1e-3 through the MLP)
        top_k: teacher tokens cached per position (the rest of its mass is one tail bucket)
        max_new_tokens: the teacher's continuation of each input is at most this long
        stop: a continuation ends at this string (repeatable; none given: at a newline)
        n_self_study: inputs the teacher writes when none are given
        self_study_prompt: what the teacher is asked to write inputs (used when the template has nothing before {input})
        self_study_temperature: sampling temperature of self-study
        heldout: fraction of the distinct inputs held out for the report
        max_inputs: use at most this many inputs (0: all)
        eval_every: also evaluate the held-out KL every N steps (0: at the end)
        teacher_batch_size: rows per teacher generation or forward batch
        seed: seeds self-study, the split, the init and the loop
        overwrite: write into an OUT that already holds files (the earlier run's files are replaced)
        progress: print what happens and a progress bar (stderr)
        base: a local HuggingFace model directory (default: the embedded model)
    """

    prompt_file: str | None = None
    out: str | None = None
    inputs: str | None = None
    input_field: str | None = None  # None: "input", else "prompt"
    label_field: str | None = None  # None: "output", else "completion"
    chat: bool = False
    template: str = "{input}"
    num_virtual_tokens: int = 16  # small: the point is compression (the sanity run's P, docs/distill.md)
    init: str = "prompt"
    projection_dim: int = 0
    steps: int = TrainConfig.steps  # the training loop's own defaults
    batch_size: int = TrainConfig.batch_size
    lr: float | None = None
    top_k: int = 32
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ("\n",)
    n_self_study: int = 64
    self_study_prompt: str = SELF_STUDY_PROMPT
    self_study_temperature: float = 0.7  # 1.0 wrote mostly malformed inputs on the embedded model (docs/distill.md)
    heldout: float = 0.2
    max_inputs: int = 0
    eval_every: int = 0
    teacher_batch_size: int = 16
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    model: ModelConfig = ModelConfig()
    OPTIONS: typing.ClassVar = ("inputs", "input_field", "label_field", "chat", "template", "num_virtual_tokens",
                                "init", "projection_dim", "steps", "batch_size", "lr", "top_k", "max_new_tokens",
                                "stop", "n_self_study", "self_study_prompt", "self_study_temperature", "heldout",
                                "max_inputs", "eval_every", "teacher_batch_size", "seed", "overwrite", "progress",
                                "model.base", "model.device", "model.dtype", "model.threads")
    FLAG_NAMES: typing.ClassVar = {}
    POSITIONAL: typing.ClassVar = ("prompt_file", "out")

    def __post_init__(self):
        object.__setattr__(self, "stop", _stop(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if "{input}" not in self.template:
            raise ValueError(f"template must mark the input's place with {{input}}, got {self.template!r}")
        if self.init not in DISTILL_INITS:
            raise ValueError(f"init must be one of {', '.join(DISTILL_INITS)}, got {self.init!r}")
        for name in ("num_virtual_tokens", "steps", "batch_size", "top_k", "max_new_tokens", "teacher_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("projection_dim", "max_inputs", "eval_every", "n_self_study"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not 0 < self.heldout < 1:
            raise ValueError(f"heldout must be a fraction between 0 and 1 (exclusive), got {self.heldout}")
        if not self.self_study_temperature > 0:
            raise ValueError(f"self_study_temperature must be above 0 (self-study samples), "
                             f"got {self.self_study_temperature}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @classmethod
    def of(cls, **options) -> "DistillConfig":
        """From flat names: `DistillConfig.of(steps=60, num_virtual_tokens=16, base="path")`."""
        return config_of(cls, options)
