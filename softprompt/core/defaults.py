"""The one source of defaults: what the library, the command line and the saved run all use.

A method's config (`PrefixTuningConfig`, `PromptTuningConfig`, `PTuningConfig`, in
softprompt/methods/config.py), `TrainConfig` and `DataConfig` (softprompt/loops/config.py) and the
run's own parts (`RunConfig`, softprompt/runs/config.py; its `ModelConfig`, which serving shares, is
below) are frozen dataclasses whose field defaults
are the defaults; the CLI builds its flags from the same dataclasses, so `sp.train(...)` from a
notebook and `softprompt train` on the command line start from the same place. What depends on the
method (its init, its learning rate) each method's config answers itself (`default_init`,
`default_lr`), from the tables below.

Defaults measured on E2E with the embedded model (docs/benchmarks):
- prefix and prompt tuning start from text (Li & Liang's "activations of real words"; Lester et
  al.'s vocabulary init): a random prefix starts at loss 7.2 against 3.0 for the bare model;
- learning rates: prefix tuning through the MLP 1e-3, a direct prefix 5e-3, prompt tuning 3e-2,
  P-tuning 1e-3.
Classification, measured on SST-2 (bench/quality_sst2.py): the head and an encoder's direct deep
prompt train at the same rate, a decoder's prefix through label words at 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace

INIT_TEXT = "Read the input and write the answer in the same style as the examples."

LR = {"prefix_tuning": 1e-3, "prefix_tuning_direct": 5e-3, "prompt_tuning": 3e-2, "p_tuning": 1e-3}
LR_FALLBACK = 1e-3  # a prompt of no known method

CLASSIFY_LR = {"head_only": 1e-2, "prefix_tuning": 1e-2, "prefix_tuning_mlp": 1e-3, "prefix_tuning_decoder": 1e-4,
               "prompt_tuning": 3e-2, "p_tuning": 1e-3}
POOLING = "mean"  # an encoder classifier's pooling (mean or cls): ClassifyConfig's and EncoderClassifier's
HEAD_LR = 1e-2  # the head's own rate in every encoder run (the linear probe's best), whatever the prompt's lr


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base and where it runs: part of a training run (RunConfig, runs/config.py), of
    `softprompt serve` (ServeConfig, serve/config.py), of eval and generate."""

    base: str | None = None  # a local HuggingFace model directory; None: the embedded model
    device: str = "auto"
    dtype: str = "float32"
    quantize: str = "none"
    threads: int = 0
    lora: str | None = None  # a PEFT LoRA adapter applied to the base first
    merge_lora: bool = True


def config_of(cls, options: dict):
    """A config made of sections (fields whose default is a dataclass, e.g. `model: ModelConfig`)
    from flat option names: each name is one of the config's own fields, or else a field of one of
    its sections (the first that has it); a section may also be given whole (a dataclass or a dict).
    An unknown name is a ValueError naming it."""
    own = {f.name: f for f in fields(cls)}
    sections = {name: f for name, f in own.items() if is_dataclass(f.default)}
    kw, parts = {}, {name: {} for name in sections}
    for key, value in options.items():
        if key in sections and isinstance(value, dict):
            parts[key].update(value)
        elif key in own:
            kw[key] = tuple(value) if isinstance(value, list) else value
        else:
            section = next((s for s, f in sections.items() if key in {x.name for x in fields(f.default)}), None)
            if section is None:
                raise ValueError(f"no option {key!r} for {cls.__name__}")
            parts[section][key] = tuple(value) if isinstance(value, list) else value
    for name, values in parts.items():
        if values:
            kw[name] = replace(kw.get(name, sections[name].default), **values)
    return cls(**kw)
