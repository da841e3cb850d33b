"""The methods' configs: frozen dataclasses, torch-free (the command line builds its parser from them
before anything heavy loads). Each config also knows its own open defaults: the init it starts from
when none was named (`default_init`) and the learning rate it trains at (`default_lr`), read from
the tables in softprompt/core/defaults.py. No caller asks which method it holds to pick them.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, fields

from softprompt.core import defaults

# PEFT's task types that a prompt can serve here (PEFT's `TaskType` values, or the plain strings).
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS")
PROMPT_TUNING_INITS = ("random", "vocab", "text", "tokens")
PREFIX_TUNING_INITS = ("random", "text")
P_TUNING_ENCODERS = ("mlp", "lstm")


def check_task_type(config, task_type) -> None:
    """PEFT's `task_type=` on a config: None (the model decides), or one of TASK_TYPES, kept as a plain
    string on `config.task_type`. It is not a dataclass field (an InitVar): a run's flags, cards and
    run.json, built from the fields, stay as they were; `sp.create` checks it against the model."""
    value = getattr(task_type, "value", task_type)  # PEFT's TaskType enum
    if value is not None and (not isinstance(value, str) or value.upper() not in TASK_TYPES):
        raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)} (PEFT's names), got {task_type!r}")
    object.__setattr__(config, "task_type", None if value is None else value.upper())


def check_num_virtual_tokens(n) -> None:
    """Validated once, at the config boundary, before any tensor is sized by it."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}")


@dataclass(frozen=True)
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: str | None = None  # None: "text" when create() is given a tokenizer, else "vocab" (default_init)
    init_text: str | None = None  # None: defaults.INIT_TEXT
    init_tokens: tuple[int, ...] | None = None
    residual_dim: int = 0  # 0: the prompt is the parameter; > 0: residual reparameterization of this width
    seed: int = 0

    # PEFT's task type (TASK_TYPES; None: the model's); an InitVar, read back as `config.task_type`
    task_type: InitVar[str | None] = None

    method = "prompt_tuning"

    def __post_init__(self, task_type=None):
        check_task_type(self, task_type)
        check_num_virtual_tokens(self.num_virtual_tokens)
        if self.init is not None and self.init not in PROMPT_TUNING_INITS:
            raise ValueError(f"prompt tuning init must be one of {PROMPT_TUNING_INITS}, got {self.init!r}")
        if self.init_text is not None and not self.init_text:
            raise ValueError("init_text must be a non-empty string")
        if self.init == "tokens" and not self.init_tokens:
            raise ValueError("init='tokens' needs init_tokens (a non-empty list of token ids)")
        if isinstance(self.residual_dim, bool) or not isinstance(self.residual_dim, int) or self.residual_dim < 0:
            raise ValueError(f"residual_dim must be >= 0 (0 = no reparameterization), got {self.residual_dim!r}")

    def default_init(self, has_tokenizer: bool, encoder: bool = False) -> str:
        """Text when a tokenizer is at hand (the CLI always has one), else the vocabulary; an encoder
        classifier starts from the vocabulary."""
        return "text" if has_tokenizer and not encoder else "vocab"

    def default_lr(self, task: str = "generate", encoder: bool = False) -> float:
        return (defaults.CLASSIFY_LR if task == "classify" else defaults.LR)["prompt_tuning"]


@dataclass(frozen=True)
class PrefixTuningConfig:
    num_virtual_tokens: int = 20
    projection_dim: int = 512  # 0: direct optimization of the prefix
    init: str | None = None  # None: "text" when create() is given a tokenizer, else "random" (default_init)
    init_text: str | None = None  # None: defaults.INIT_TEXT
    seed: int = 0

    # PEFT's task type (TASK_TYPES; None: the model's); an InitVar, read back as `config.task_type`
    task_type: InitVar[str | None] = None

    method = "prefix_tuning"

    def __post_init__(self, task_type=None):
        check_task_type(self, task_type)
        check_num_virtual_tokens(self.num_virtual_tokens)
        if self.init is not None and self.init not in PREFIX_TUNING_INITS:
            raise ValueError(f"prefix tuning init must be one of {PREFIX_TUNING_INITS}, got {self.init!r}")
        if self.init_text is not None and not self.init_text:
            raise ValueError("init_text must be a non-empty string")
        if isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) or self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0 = no MLP), got {self.projection_dim}")

    def default_init(self, has_tokenizer: bool, encoder: bool = False) -> str:
        return "text" if has_tokenizer else "random"

    def default_lr(self, task: str = "generate", encoder: bool = False) -> float:
        """Generation: 1e-3 through the MLP, 5e-3 on a direct prefix. Classification: a decoder's label
        words at 1e-4 (1e-3 collapsed to one class), an encoder's deep prompt at the head's rate."""
        if task == "classify":
            key = "prefix_tuning_decoder" if not encoder else "prefix_tuning_mlp" if self.projection_dim \
                else "prefix_tuning"
            return defaults.CLASSIFY_LR[key]
        return defaults.LR["prefix_tuning" if self.projection_dim else "prefix_tuning_direct"]


@dataclass(frozen=True)
class PTuningConfig:
    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None  # default: the model's hidden size
    seed: int = 0

    # PEFT's task type (TASK_TYPES; None: the model's); an InitVar, read back as `config.task_type`
    task_type: InitVar[str | None] = None

    method = "p_tuning"

    def __post_init__(self, task_type=None):
        check_task_type(self, task_type)
        check_num_virtual_tokens(self.num_virtual_tokens)
        if self.encoder not in P_TUNING_ENCODERS:
            raise ValueError(f"P-tuning encoder must be one of {P_TUNING_ENCODERS}, got {self.encoder!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError("encoder_hidden_size must be positive")

    def default_init(self, has_tokenizer: bool, encoder: bool = False) -> None:
        return None  # the encoder's own initialization

    def default_lr(self, task: str = "generate", encoder: bool = False) -> float:
        return (defaults.CLASSIFY_LR if task == "classify" else defaults.LR)["p_tuning"]


CONFIGS = {cls.method: cls for cls in (PromptTuningConfig, PrefixTuningConfig, PTuningConfig)}
ALIASES = {"prompt": "prompt_tuning", "prefix": "prefix_tuning", "ptuning": "p_tuning", "p-tuning": "p_tuning"}


def canonical(method: str) -> str:
    name = ALIASES.get(method, method).replace("-", "_")
    if name not in CONFIGS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(CONFIGS)}")
    return name


def config_of(method: str, options: dict):
    """The method's config from a dict that may hold other keys (a prompt's `config_dict()`)."""
    cls = CONFIGS[canonical(method)]
    names = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items() if k in names})


def default_lr_of(prompt) -> float:
    """The learning rate a prompt object trains at unless told otherwise: its method's config's (with
    the prompt's own projection width); a prompt of another kind: defaults.LR_FALLBACK."""
    method = getattr(prompt, "method", "")
    if method not in CONFIGS:
        return defaults.LR_FALLBACK
    shape = {"projection_dim": prompt.projection_dim} if hasattr(prompt, "projection_dim") else {}
    return config_of(method, shape).default_lr()
