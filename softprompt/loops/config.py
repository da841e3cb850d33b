"""The loop's configs, torch-free (the command line builds its parser from them before anything
heavy loads): `TrainConfig` (the training loop, train.py) and `DataConfig` (how rows become
examples, data.py). Both modules export them too."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("linear", "cosine", "constant")
HIGHER_IS_BETTER = {"bleu", "rouge_l", "exact_match", "accuracy", "f1"}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8  # global: rows per optimizer step over all processes
    micro_batch_size: int = 0  # rows per forward pass (0: the whole per-process batch)
    lr: float | None = None  # None: the method's config's default_lr(), resolved by the Trainer
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    eval_every: int = 0  # 0: only at the end (if there is an eval split)
    eval_generate: int = 0  # also generate for this many eval inputs and score them
    eval_max_new_tokens: int = 64
    metric: str = "eval_loss"  # what picks the best artifact and drives early stopping
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    checkpoint_every: int = 50  # 0: no checkpoints; only written when the run has an output directory
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    log_every: int = 1

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.metric != "eval_loss" and self.metric not in HIGHER_IS_BETTER:
            raise ValueError(f"metric must be eval_loss or one of {sorted(HIGHER_IS_BETTER)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("warmup_steps must be between 0 and steps")


@dataclass(frozen=True)
class DataConfig:
    """How rows become examples. `template`/`target` None: the format's own fields."""

    template: str | None = None  # prompt template over a row's fields, e.g. "{mr} ||"
    target: str | None = None  # target field (or a template if it contains "{")
    chat_template: bool = False  # wrap the prompt in the tokenizer's chat template as a user turn
    max_length: int = 512  # prompt + target + eos tokens
    skip_bad_rows: bool = False
    max_rows: int = 0  # 0: all rows
    delimiter: str | None = None  # CSV delimiter (default: "," or tab for .tsv)

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
