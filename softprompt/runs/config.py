"""One training run's whole configuration: `RunConfig`, frozen, made of the configs that exist.

    RunConfig
      train_data, eval_data, eval_fraction, task, method     what to train on, and what
      model:    ModelConfig      the frozen base: path, device, dtype, quantize, threads, LoRA
      data:     DataConfig       how rows become examples (softprompt/loops/config.py)
      prompt:   the method's config, chosen by `method` (softprompt/methods/config.py), built once
      train:    TrainConfig      the loop (softprompt/loops/config.py)
      output:   OutputConfig     the run directory, overwrite/resume, trackers, the progress bar
      classify: ClassifyConfig   labels, label words, pooling (only with task "classify")

`to_dict()` is what `--config FILE` reads and what a run writes as its `run.json` (plus the facts
the run learned, RUN_FACTS, which `from_dict` skips), so `softprompt train --config runs/x/run.json`
trains the same run again. Every default is a field default here or in the configs it is made of.
Torch-free: the command line builds its parser from these classes before anything heavy loads.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields, is_dataclass, replace

from softprompt.loops.config import DataConfig, TrainConfig
from softprompt.methods.config import CONFIGS, canonical

TASKS = ("generate", "classify")
HEAD_ONLY = "head_only"  # classification on an encoder with a head and no prompt (the linear probe)
HEAD_ONLY_ALIASES = (HEAD_ONLY, "head-only", "head", "linear_probe")
RUN_FACTS = ("data_path", "world", "bad_rows", "classify_template")  # written to run.json by the run, not options


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base and where it runs."""

    base: str | None = None  # a local HuggingFace model directory; None: the embedded model
    device: str = "auto"
    dtype: str = "float32"
    quantize: str = "none"
    threads: int = 0
    lora: str | None = None  # a PEFT LoRA adapter applied to the base first
    merge_lora: bool = True


@dataclass(frozen=True)
class OutputConfig:
    """Where the run writes, and who hears of it."""

    out: str | None = None  # the run directory (None: nothing written; the Python API)
    overwrite: bool = False
    resume: bool = False
    report_to: tuple[str, ...] = ()
    progress: bool = True


@dataclass(frozen=True)
class ClassifyConfig:
    labels: tuple[str, ...] = ()
    label_words: tuple[str, ...] | None = None
    pooling: str = "mean"


def _tuple(value):
    if value is None or isinstance(value, tuple):
        return value
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


@dataclass(frozen=True)
class RunConfig:
    train_data: str | None = None  # .jsonl, .csv/.tsv, or hf:NAME[:SPLIT]
    eval_data: str | None = None
    eval_fraction: float = 0.0
    task: str = "generate"
    method: str = "prefix_tuning"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    prompt: object = None  # the method's config; None: its defaults (head_only: none)
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    classify: ClassifyConfig | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: resolved once, here)
        if self.task not in TASKS:
            raise ValueError(f"--task must be generate or classify, got {self.task!r}")
        if self.task == "classify" and self.method in HEAD_ONLY_ALIASES:
            set_("method", HEAD_ONLY)
            if self.prompt is not None:
                raise ValueError("head_only trains no prompt; it takes no prompt options")
        else:
            set_("method", canonical(self.method))
            cls = CONFIGS[self.method]
            if self.prompt is None:
                set_("prompt", cls(seed=self.train.seed))
            elif not isinstance(self.prompt, cls):
                raise ValueError(f"method {self.method} needs a {cls.__name__}, got {type(self.prompt).__name__}")
        set_("output", replace(self.output, report_to=_tuple(self.output.report_to) or ()))
        if self.task == "classify":
            self._check_classify(set_)

    def _check_classify(self, set_) -> None:
        clf = self.classify or ClassifyConfig()
        clf = replace(clf, labels=_tuple(clf.labels) or (), label_words=_tuple(clf.label_words))
        if not clf.labels:
            raise ValueError("--task classify needs --labels (e.g. --labels negative,positive)")
        if clf.label_words is not None and len(clf.label_words) != len(clf.labels):
            raise ValueError(f"--label-words needs one word per label ({len(clf.labels)}), got {len(clf.label_words)}")
        set_("classify", clf)
        unsupported = {"lora": self.model.lora, "chat-template": self.data.chat_template,
                       "eval-generate": self.train.eval_generate, "gradient-checkpointing":
                       self.train.gradient_checkpointing, "report-to": self.output.report_to}
        for flag, value in unsupported.items():
            if value:
                raise ValueError(f"--{flag} is not supported with --task classify")
        metric = "accuracy" if self.train.metric == "eval_loss" else self.train.metric
        if metric not in ("accuracy", "f1"):
            raise ValueError(f"--task classify picks the best by accuracy or f1, not {metric}")
        set_("train", replace(self.train, metric=metric))

    # --- the dict form: --config FILE and run.json ---------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = _plain(value) if is_dataclass(value) else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The config from its dict (nested, as `to_dict` writes it; flat option names such as
        `steps` or `num_virtual_tokens` are accepted too). An unknown name is a one-line error."""
        d = nest(d)
        task = d.get("task", "generate")
        method = d.get("method", RunConfig.method)
        kw = {k: v for k, v in d.items() if k in TOP}
        for name, section in SECTIONS.items():
            if name in d and d[name] is not None:
                kw[name] = _section(section, d[name], name)
        if task == "classify" and "classify" not in kw:
            kw["classify"] = ClassifyConfig()
        prompt = dict(d.get("prompt") or {})
        if task != "classify" or method not in HEAD_ONLY_ALIASES:
            name = canonical(method)
            prompt.setdefault("seed", (kw.get("train") or TrainConfig()).seed)
            if task == "classify" and hasattr(CONFIGS[name], "projection_dim") and "projection_dim" not in prompt \
                    and _classify_on_encoder((kw.get("model") or ModelConfig()).base):
                prompt["projection_dim"] = 0  # measured on SST-2: a direct deep prompt on an encoder
            kw["prompt"] = _section(CONFIGS[name], prompt, "prompt", f" for {name}")
        elif prompt:
            raise ValueError(f"head_only trains no prompt; no prompt option {', '.join(map(repr, prompt))}")
        return cls(**kw)

    @classmethod
    def of(cls, **options) -> "RunConfig":
        """From flat option names (`RunConfig.of(train_data="d.jsonl", steps=10, num_virtual_tokens=4)`)."""
        return cls.from_dict(options)


def _plain(value):
    out = {}
    for f in fields(value):
        v = getattr(value, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "output": OutputConfig,
            "classify": ClassifyConfig}
TOP = ("train_data", "eval_data", "eval_fraction", "task", "method")


def prompt_fields() -> dict:
    """Every prompt option of any method: name -> (type, {method: default})."""
    out: dict = {}
    for name, cls in CONFIGS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            out.setdefault(f.name, (hints[f.name], {}))[1][name] = f.default
    return out


def flat_names() -> dict[str, tuple[str, str] | tuple[str]]:
    """Flat option name -> where it lives: ("train", "steps"), or ("method",) for a top-level one.
    A name two sections share (seed: the loop's and the prompt's) goes to the first one listed; the
    prompt's seed follows the loop's unless `prompt.seed` is given."""
    out: dict = {name: (name,) for name in TOP}
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
                         ("output", OutputConfig), ("classify", ClassifyConfig)):
        for f in fields(cls):
            out.setdefault(f.name, (section, f.name))
    for name in prompt_fields():
        out.setdefault(name, ("prompt", name))
    out.setdefault("data_path", ("train_data",))  # the name older run.json files gave it
    return out


def nest(d: dict) -> dict:
    """A dict with flat names (steps: 3) or nested sections ({train: {steps: 3}}), or both, nested."""
    if not isinstance(d, dict):
        raise ValueError("a run's config must be a mapping of option names to values")
    flat = flat_names()
    out: dict = {}
    for key, value in d.items():
        if key in RUN_FACTS and key != "data_path":
            continue
        if key == "data_path" and "train_data" in d:
            continue
        if key in ("method_options",):  # older run.json: the prompt's options under this name
            out.setdefault("prompt", {}).update(value or {})
            continue
        if key in SECTIONS or key == "prompt":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{key!r} must be a mapping of option names to values")
            out.setdefault(key, {}).update(value or {})
        elif key in flat:
            where = flat[key]
            if len(where) == 1:
                out[where[0]] = value
            else:
                out.setdefault(where[0], {})[where[1]] = value
        else:
            raise ValueError(f"no option {key!r} for a training run (options: {', '.join(sorted(flat))})")
    return out


def _section(cls, values: dict, name: str, what: str = ""):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"no option {', '.join(f'{name}.{u}' for u in unknown)}{what} "
                         f"(options: {', '.join(sorted(names))})")
    hints = typing.get_type_hints(cls)
    kw = {}
    for key, value in values.items():
        if isinstance(value, list) or (isinstance(value, str) and "tuple" in str(hints[key])):
            value = _tuple(value)
        kw[key] = value
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"{name}: {e}") from None


# compare's own defaults for the run's options (its budget is smaller than a training run's, and it
# always holds data out); the command line's `compare` flags start from these (cli.py).
RUN_DEFAULTS = {"steps": 50, "eval_fraction": 0.2, "out": "out/compare"}


@dataclass(frozen=True)
class CompareConfig:
    """`softprompt compare`: the shared run options (`run`: data, base, template/target, held-out data,
    steps, batch size, seed, P, progress) and what only the comparison has."""

    run: RunConfig = RunConfig.of(**RUN_DEFAULTS)
    lora_r: int = 8  # LoRA rank (q_proj and v_proj)
    lora_lr: float = 1e-3
    max_new_tokens: int = 16  # tokens generated per row when measuring tokens/s
    tasks: int = 16  # rows (and distinct tasks, when mixed) in the tokens/s measurement
    eval_inputs: int = 50  # distinct held-out inputs scored (0: all)
    eval_max_new_tokens: int = TrainConfig.eval_max_new_tokens


def _classify_on_encoder(base) -> bool:
    from softprompt.runs.classify import classify_on_encoder

    return classify_on_encoder(base)


__all__ = ["RunConfig", "CompareConfig", "ModelConfig", "OutputConfig", "ClassifyConfig", "DataConfig", "TrainConfig"]
