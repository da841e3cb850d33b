"""The protocol every model family implements. Generic code calls only these; what differs between
a causal decoder, an encoder-decoder and an encoder (where a prefix enters, how inputs are
tokenized, the objective, generation, serving, PEFT's layout) lives behind them."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod


class FamilyRefusal(ValueError):
    """What a family cannot do (yet); the message says what to do instead (a ValueError: the CLI
    prints it as one line)."""


class Family(ABC):
    name: str  # recorded on cards as `model_family`
    description: str  # for messages: "decoder-only", "encoder-decoder", "encoder"
    padding_side: str = "left"  # how load_base sets the tokenizer
    peft_task_types: tuple[str, ...] = ()  # PEFT adapters of these task types belong to this family
    # protocol step -> "module:name" that does it, imported on first use (most processes need one
    # family); a step the family has no entry for is refused in one line (see `_step`)
    steps: dict[str, str] = {}

    def _step(self, step: str, refusal: str):
        """The function (or class) that does `step` for this family, or FamilyRefusal(refusal)."""
        target = self.steps.get(step)
        if target is None:
            raise FamilyRefusal(refusal.format(name=self.name))
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    @staticmethod
    @abstractmethod
    def matches(config) -> bool:
        """Whether a model with this config belongs to the family."""

    # --- the model ----------------------------------------------------------------------------
    def auto_model_class(self):
        """The transformers Auto class that loads such a model with its head."""
        raise FamilyRefusal(f"{self.name} models are not loaded by load_base")

    def geometry(self, model):
        """The attention shapes a prompt is built for (`core.geometry.Geometry` or the family's own)."""
        return self._step("geometry", "{name} models have no prompt geometry")(model)

    def card_geometry(self, geo: dict):
        """The geometry a card records (a dict of its fields) as the family's geometry class; None when
        the dict is not one (fields missing or extra)."""
        from softprompt.core.geometry import Geometry

        return from_fields(Geometry, geo)

    # --- prompts ------------------------------------------------------------------------------
    def methods(self) -> dict:
        """Card method name -> prompt class (with `from_export` and `expected_shapes`)."""
        return self._step("methods", "{name} models have no prompt methods")

    def accepts_card_family(self, name: str) -> bool:
        """Whether a prompt whose card records `model_family = name` may load on this family."""
        return name == self.name

    def shape_options(self, card: dict) -> dict:
        """Extra keyword arguments of `expected_shapes` read from a card."""
        return {}

    def create(self, method: str, model, tokenizer=None, **options):
        """A fresh prompt of `method` for `model`."""
        return self._step("create", "{name} models have no prompt methods")(method, model, tokenizer, **options)

    def load_prefix(self, tensors: dict):
        """The `Prefix` a prompt of this family compiles to, from its `tensors()` (the store's
        compiled form): a decoder's (and an encoder's deep prompt's) is one KV tensor."""
        from softprompt.methods.base import KVPrefix

        return KVPrefix.from_tensors(tensors)

    def describe_prefix(self, card: dict) -> str | None:
        """The serving form of a card's prompt, for the model card (None: nothing to add)."""
        return None

    # --- data and training --------------------------------------------------------------------
    def tokenize(self, examples, tokenizer, cfg, bad=None):
        return self._step("tokenize", _NO_TRAINING)(examples, tokenizer, cfg, bad)

    def objective(self):
        return self._step("objective", _NO_TRAINING)()

    # --- inference ----------------------------------------------------------------------------
    def generate(self, model, tokenizer, prompts, prefix, params):
        return self._step("generate", "{name} models do not generate text; use --task classify")(
            model, tokenizer, prompts, prefix, params)

    def evaluate_groups(self, model, tokenizer, groups, prefix, **options) -> dict:
        return self._step("evaluate_groups", "{name} models do not generate text; evaluate a classifier with "
                                             "--task classify")(model, tokenizer, groups, prefix, **options)

    # --- PEFT ---------------------------------------------------------------------------------
    def import_peft(self, path, config: dict, embeddings, model):
        """One of our prompts from a PEFT adapter of this family (its config and `prompt_embeddings`
        tensor); a ValueError says why one does not fit."""
        return self._step("import_peft", "PEFT adapters for {name} models are not imported")(
            path, config, embeddings, model)


_NO_TRAINING = "{name} models do not train on text generation data; use --task classify"


def from_fields(cls, values: dict):
    """cls(**values) for a dataclass whose fields are exactly the dict's keys; else None."""
    from dataclasses import fields

    if not isinstance(values, dict) or set(values) != {f.name for f in fields(cls)}:
        return None
    try:
        return cls(**values)
    except TypeError:
        return None
