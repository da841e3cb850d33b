"""The protocol every model family implements. Generic code calls only these; what differs between
a causal decoder, an encoder-decoder and an encoder (where a prefix enters, how inputs are
tokenized, the objective, generation, serving, PEFT's layout) lives behind them."""

from __future__ import annotations

from abc import ABC, abstractmethod


class FamilyRefusal(ValueError):
    """What a family cannot do (yet); the message says what to do instead (a ValueError: the CLI
    prints it as one line)."""


class Family(ABC):
    name: str  # recorded on cards as `model_family`
    description: str  # for messages: "decoder-only", "encoder-decoder", "encoder"
    padding_side: str = "left"  # how load_base sets the tokenizer
    peft_task_types: tuple[str, ...] = ()  # PEFT adapters of these task types belong to this family
    flat_prefix: bool = False  # a prompt compiles to one KV tensor (L, 2, H, P, D) the store can keep

    @staticmethod
    @abstractmethod
    def matches(config) -> bool:
        """Whether a model with this config belongs to the family."""

    # --- the model ----------------------------------------------------------------------------
    def auto_model_class(self):
        """The transformers Auto class that loads such a model with its head."""
        raise FamilyRefusal(f"{self.name} models are not loaded by load_base")

    @abstractmethod
    def geometry(self, model):
        """The attention shapes a prompt is built for (`models.Geometry` or the family's own)."""

    # --- prompts ------------------------------------------------------------------------------
    @abstractmethod
    def methods(self) -> dict:
        """Card method name -> prompt class (with `from_export` and `expected_shapes`)."""

    def accepts_card_family(self, name: str) -> bool:
        """Whether a prompt whose card records `model_family = name` may load on this family."""
        return name == self.name

    def shape_options(self, card: dict) -> dict:
        """Extra keyword arguments of `expected_shapes` read from a card."""
        return {}

    @abstractmethod
    def create(self, method: str, model, tokenizer=None, **options):
        """A fresh prompt of `method` for `model`."""

    def prefix_to(self, prefix, device, dtype):
        """A compiled prompt moved to the model's device and dtype (for serving)."""
        return prefix.detach().to(device=device, dtype=dtype).contiguous()

    # --- data and training --------------------------------------------------------------------
    def tokenize(self, examples, tokenizer, cfg, bad=None):
        raise FamilyRefusal(f"{self.name} models do not train on text generation data; use --task classify")

    def objective(self):
        raise FamilyRefusal(f"{self.name} models do not train on text generation data; use --task classify")

    # --- inference ----------------------------------------------------------------------------
    def generate(self, model, tokenizer, prompts, prefix, params):
        raise FamilyRefusal(f"{self.name} models do not generate text; use --task classify")

    def evaluate_groups(self, model, tokenizer, groups, prefix, **options) -> dict:
        raise FamilyRefusal(f"{self.name} models do not generate text; evaluate a classifier with --task classify")


    # --- PEFT ---------------------------------------------------------------------------------
    def import_peft(self, path, config: dict, embeddings, model):
        raise FamilyRefusal(f"PEFT adapters for {self.name} models are not imported")
