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

from softprompt.core.defaults import POOLING, ModelConfig, config_of
from softprompt.loops.config import DataConfig, TrainConfig
from softprompt.methods.config import CONFIGS, canonical

TASKS = ("generate", "classify")
HEAD_ONLY = "head_only"  # classification on an encoder with a head and no prompt (the linear probe)
HEAD_ONLY_ALIASES = (HEAD_ONLY, "head-only", "head", "linear_probe")
RUN_FACTS = ("data_path", "world", "bad_rows", "classify_template")  # written to run.json by the run, not options


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
    pooling: str = POOLING


@dataclass(frozen=True)
class EvalConfig:
    """Score an adapter on a dataset: BLEU, ROUGE-L, exact match, accuracy (references grouped per input).

    A classifier artifact is scored by accuracy and macro-F1 instead (runs/classify.py).

    Args:
        adapter: artifact path or PEFT adapter directory (omit: the bare model)
        data: evaluation data (required; same formats as train)
        base: a local HuggingFace model directory (default: the embedded model)
        template: prompt template over a row's fields, e.g. "{mr} ||"
        target: the reference field (a classifier: the label column)
        chat_template: wrap each prompt in the base model's chat template
        max_new_tokens: at most this many new tokens per output
        num_beams: 1: greedy; more: beam search
        batch_size: inputs per generation batch (greedy)
        max_inputs: score only the first N distinct inputs (0: all)
        skip_bad_rows: skip and count bad rows instead of stopping
        predictions: write one JSON line per input (prompt, output, references) here
        allow_other_base: load an artifact even if it was made for other base weights
        json: print the metrics as JSON
        lora: a PEFT LoRA adapter directory (safetensors) applied to the base first, for prompts trained with --lora
        merge_lora: merge the LoRA weights into the base (--no-merge-lora keeps LoRA layers)
    """

    eval_data: str | None = None  # the flag --data
    adapter: str | None = None  # None or "none": the bare model
    model: ModelConfig = ModelConfig()
    rows: DataConfig = DataConfig()  # how rows become examples: template, target, chat template, skip_bad_rows
    max_new_tokens: int = TrainConfig.eval_max_new_tokens
    num_beams: int = 1
    batch_size: int = 16
    max_inputs: int = 0  # 0: every distinct input
    predictions: str | None = None  # a JSONL file of the outputs
    allow_other_base: bool = False
    json: bool = False  # print the metrics as JSON
    # `softprompt eval`'s flags, in --help's order: a field, or a section's field (cli.py builds them)
    OPTIONS: typing.ClassVar = ("adapter", "eval_data", "model.base", "rows.template", "rows.target",
                                "rows.chat_template", "max_new_tokens", "num_beams", "batch_size", "max_inputs",
                                "rows.skip_bad_rows", "predictions", "allow_other_base", "json", "model.lora",
                                "model.merge_lora", "model.device", "model.dtype", "model.quantize", "model.threads")
    FLAG_NAMES: typing.ClassVar = {"eval_data": "data"}
    POSITIONAL: typing.ClassVar = ()

    @classmethod
    def of(cls, **options) -> "EvalConfig":
        """From flat names: `EvalConfig.of(adapter="a", eval_data="d.csv", template="{mr} ||", base=...)`."""
        return config_of(cls, options)


@dataclass(frozen=True)
class GenerateConfig:
    """Continue a prompt with an adapter (ours or a PEFT adapter directory) and print the continuation.

    Greedy by default, so the same input gives the same output. The prompt is used as given.

    Args:
        prompt: the text to continue
        adapter: artifact path (directory or .safetensors) or PEFT adapter directory; none: the bare model
        base: a local HuggingFace model directory (default: the embedded model)
        max_new_tokens: at most this many new tokens
        temperature: 0 is greedy; above 0 samples
        top_k: sample only among the k most likely tokens (0: all)
        top_p: sample only within this much probability mass (1: all)
        seed: seed for sampling
        stop: stop when the continuation contains this string (repeatable)
        chat: wrap the prompt in the base model's chat template as a user turn
        allow_other_base: load an artifact even if it was made for other base weights
        lora: a PEFT LoRA adapter directory (safetensors) applied to the base model first
        merge_lora: merge the LoRA weights into the base (--no-merge-lora keeps LoRA layers)
    """

    prompt: str
    adapter: str | None = None
    model: ModelConfig = ModelConfig()
    max_new_tokens: int = TrainConfig.eval_max_new_tokens
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    chat: bool = False
    allow_other_base: bool = False
    OPTIONS: typing.ClassVar = ("adapter", "model.base", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                                "stop", "chat", "allow_other_base", "model.lora", "model.merge_lora", "model.device",
                                "model.dtype", "model.quantize", "model.threads")
    FLAG_NAMES: typing.ClassVar = {}
    POSITIONAL: typing.ClassVar = ("prompt",)

    @classmethod
    def of(cls, **options) -> "GenerateConfig":
        return config_of(cls, options)


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

COMPARE_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning", "lora", "full")
DEFAULT_COMPARE_METHODS = ("prefix_tuning", "prompt_tuning", "lora")
_COMPARE_ALIASES = {"prefix": "prefix_tuning", "prompt": "prompt_tuning", "ptuning": "p_tuning",
                    "full_finetuning": "full", "fine_tuning": "full", "finetune": "full", "ft": "full"}


def canonical_compare_method(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = _COMPARE_ALIASES.get(key, key)
    if key not in COMPARE_METHODS:
        raise ValueError(f"unknown method {name!r} for compare (choose from {', '.join(COMPARE_METHODS)})")
    return key


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
    methods: tuple[str, ...] = DEFAULT_COMPARE_METHODS  # any of COMPARE_METHODS, in the order given
    full_lr: float = 5e-5  # full fine-tuning's learning rate (every weight of a copy of the base)
    num_beams: int = 1  # > 1: beam search scored beside greedy (beam 5: the papers' decoding)
    length_penalty: float = 1.0  # beam search: a hypothesis scores logprob / length**length_penalty
    bootstrap_samples: int = 1000  # paired bootstrap resamples (sacrebleu) for intervals and p-values
    # data-efficiency curves: every method trained on subsets of this many distinct training inputs
    # (drawn per seed, nested), one run per size and seed; steps per run: at least --steps, else
    # ceil(epochs x rows / batch_size), capped at max_steps (0: no cap)
    train_sizes: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()  # (): the run's --seed
    epochs: float = 2.0
    max_steps: int = 0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: resolved once, here)
        methods = tuple(canonical_compare_method(m) for m in (_tuple(self.methods) or ()))
        if not methods:
            raise ValueError(f"--methods needs at least one of {', '.join(COMPARE_METHODS)}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"--methods names a method twice: {', '.join(methods)}")
        set_("methods", methods)
        try:
            set_("train_sizes", tuple(int(v) for v in (_tuple(self.train_sizes) or ())))
            set_("seeds", tuple(int(v) for v in (_tuple(self.seeds) or ())))
        except ValueError:
            raise ValueError("--train-sizes and --seeds take whole numbers, e.g. --train-sizes 50,200 --seeds 0,1") \
                from None
        if any(n < 1 for n in self.train_sizes) or len(set(self.train_sizes)) != len(self.train_sizes):
            raise ValueError(f"--train-sizes must be distinct positive numbers, got {self.train_sizes}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds names a seed twice: {self.seeds}")
        if self.num_beams < 1 or self.bootstrap_samples < 1 or self.epochs < 0 or self.max_steps < 0:
            raise ValueError("--num-beams and --bootstrap-samples must be positive, --epochs and --max-steps "
                             "not negative")


def _classify_on_encoder(base) -> bool:
    from softprompt.runs.classify import classify_on_encoder

    return classify_on_encoder(base)


__all__ = ["RunConfig", "CompareConfig", "ModelConfig", "OutputConfig", "ClassifyConfig", "DataConfig", "TrainConfig"]
