"""Prompt methods for encoder-decoder models: the same two ideas, three places a prefix can go.

Prefix tuning (Li & Liang 2021 did it on BART): learned K/V at every layer of the encoder's
self-attention, the decoder's self-attention and the decoder's cross-attention (`parts` picks
which). Trained directly or through the reparameterization MLP

    E = Embedding(P, kv_dim) -> Linear(kv_dim, k) -> Tanh -> Linear(k, R * kv_dim),
    R = 2 * (L_enc + 2 * L_dec) rows of K/V, split per part,

which, as for decoders, is training-only: export writes the final K/V.

Prompt tuning (Lester et al. 2021, who used T5): P embeddings before the encoder's input. The
initializations are the decoder-only ones (random / vocab / text / tokens).

Both implement the `PromptMethod` protocol with a seq2seq `forward` (encoder ids + decoder ids)
and `to_kv_prefix(model)` returning the family's `Prefix`, a `Seq2SeqPrefix` (up to four parts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from softprompt.families.seq2seq.core import (
    PARTS,
    Seq2SeqError,
    Seq2SeqGeometry,
    Seq2SeqPrefix,
    seq2seq_forward,
    seq2seq_geometry,
)
from softprompt.methods.base import PromptMethod, check_num_virtual_tokens, seeded
from softprompt.methods.config import PrefixTuningConfig
from softprompt.methods.prompt_tuning import PromptTuning


@dataclass(frozen=True)
class Seq2SeqPrefixConfig:
    num_virtual_tokens: int = PrefixTuningConfig.num_virtual_tokens  # the decoder's prefix tuning's defaults
    projection_dim: int = PrefixTuningConfig.projection_dim  # 0: the prefix tensors themselves are the parameters
    parts: tuple[str, ...] = PARTS
    init: str = "random"
    seed: int = 0

    def __post_init__(self):
        check_num_virtual_tokens(self.num_virtual_tokens)
        object.__setattr__(self, "parts", tuple(self.parts))
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"parts must be distinct names from {PARTS}, got {self.parts!r}")
        if self.init != "random":
            raise ValueError(f"seq2seq prefix tuning supports init='random' only, got {self.init!r}")
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0 = no MLP), got {self.projection_dim}")


class Seq2SeqPrefixTuning(PromptMethod):
    method = "prefix_tuning"
    family = "seq2seq"  # artifact cards record it as model_family; loading checks the base's family

    def __init__(self, geometry: Seq2SeqGeometry, num_virtual_tokens: int, parts=PARTS, projection_dim: int = 0,
                 prefixes: dict[str, torch.Tensor] | None = None, config: dict | None = None):
        super().__init__(geometry, num_virtual_tokens)
        self.parts, self.projection_dim = tuple(parts), projection_dim
        self._config = dict(config or {}, parts=list(self.parts))
        prefixes = prefixes or {}
        for part in self.parts:
            shape = geometry.part_shape(part, num_virtual_tokens)  # (L, 2, H, P, D)
            t = prefixes.get(part)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{part} prefix has shape {tuple(t.shape)}, this model needs {shape}")
            init = torch.zeros(shape) if t is None else t.detach().clone().float()
            if projection_dim:
                self.register_buffer(f"base_{part}", init)  # fixed; the MLP's output is added
            else:
                self.register_parameter(f"prefix_{part}", nn.Parameter(init))
        if projection_dim:
            rows = sum(geometry.part_shape(p, 1)[0] * 2 for p in self.parts)
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.kv_dim)
            self.transform = nn.Sequential(nn.Linear(geometry.kv_dim, projection_dim), nn.Tanh(),
                                           nn.Linear(projection_dim, rows * geometry.kv_dim))

    @classmethod
    @torch.no_grad()
    def create(cls, model, tokenizer=None, config: Seq2SeqPrefixConfig | None = None, **options):
        cfg = config or Seq2SeqPrefixConfig(**options)
        geo, P = seq2seq_geometry(model), cfg.num_virtual_tokens
        g = torch.Generator().manual_seed(cfg.seed)
        prefixes = None if cfg.projection_dim else {
            p: torch.randn(geo.part_shape(p, P), generator=g) for p in cfg.parts}  # N(0, 1), PEFT's default
        with seeded(cfg.seed):  # the MLP's default init
            return cls(geo, P, cfg.parts, cfg.projection_dim, prefixes, asdict(cfg))

    def kv(self) -> dict[str, torch.Tensor]:
        """{part: (L, 2, H, P, D)}, differentiable (through the MLP when there is one)."""
        if not self.projection_dim:
            return {p: getattr(self, f"prefix_{p}") for p in self.parts}
        g, P = self.geometry, self.num_virtual_tokens
        out = self.transform(self.embedding.weight).view(P, -1, 2, g.num_heads, g.head_dim)  # (P, R/2, 2, H, D)
        out = out.permute(1, 2, 3, 0, 4)  # (R/2, 2, H, P, D)
        sizes = [g.part_shape(p, 1)[0] for p in self.parts]
        return {p: getattr(self, f"base_{p}") + t for p, t in zip(self.parts, out.split(sizes, dim=0))}

    def prefix(self) -> Seq2SeqPrefix:
        return Seq2SeqPrefix(**self.kv())

    def forward(self, model, input_ids, attention_mask, decoder_input_ids=None, decoder_attention_mask=None, **kw):
        return seq2seq_forward(model, [self.prefix()], input_ids, attention_mask, decoder_input_ids,
                               decoder_attention_mask, **kw)

    def to_kv_prefix(self, model) -> Seq2SeqPrefix:
        p = next(model.parameters())
        with torch.no_grad():
            return Seq2SeqPrefix(**{k: v.detach().to(device=p.device, dtype=p.dtype) for k, v in self.kv().items()})

    def export_tensors(self):
        with torch.no_grad():
            return {f"prefix_{p}": t.detach().float().cpu().contiguous() for p, t in self.kv().items()}

    def config_dict(self):
        # An exported prefix has no MLP any more: it reloads as a direct prefix.
        return dict(self._config, num_virtual_tokens=self.num_virtual_tokens, projection_dim=0)

    @classmethod
    def expected_shapes(cls, geometry, num_virtual_tokens, config=None):
        parts = (config or {}).get("parts", PARTS)
        return {f"prefix_{p}": geometry.part_shape(p, num_virtual_tokens) for p in parts}

    @classmethod
    def from_export(cls, geometry, config, tensors):
        parts = [p for p in PARTS if f"prefix_{p}" in tensors]
        P = int(config.get("num_virtual_tokens") or tensors[f"prefix_{parts[0]}"].shape[3])
        return cls(geometry, P, parts, 0, {p: tensors[f"prefix_{p}"] for p in parts}, dict(config, projection_dim=0))


class Seq2SeqPromptTuning(PromptTuning):
    """P embeddings before the encoder's input; creation and storage as for decoders."""

    family = "seq2seq"

    @classmethod
    def create(cls, model, tokenizer=None, config=None, **options):
        prompt = super().create(model, tokenizer, config, **options)
        prompt.geometry = seq2seq_geometry(model)
        return prompt

    def prefix(self) -> Seq2SeqPrefix:
        return Seq2SeqPrefix(embeds=self.prompt_embeddings)

    def forward(self, model, input_ids, attention_mask, decoder_input_ids=None, decoder_attention_mask=None, **kw):
        return seq2seq_forward(model, [self.prefix()], input_ids, attention_mask, decoder_input_ids,
                               decoder_attention_mask, **kw)

    def to_kv_prefix(self, model) -> Seq2SeqPrefix:
        p = next(model.parameters())
        return Seq2SeqPrefix(embeds=self.prompt_embeddings.detach().to(device=p.device, dtype=p.dtype))

    @classmethod
    def expected_shapes(cls, geometry, num_virtual_tokens, config=None):
        return {"prompt_embeddings": (num_virtual_tokens, geometry.hidden_size)}


METHODS = {"prefix_tuning": Seq2SeqPrefixTuning, "prompt_tuning": Seq2SeqPromptTuning}


def create(method: str, model, tokenizer=None, **options) -> PromptMethod:
    """A fresh seq2seq prompt; `method` as for decoders (aliases 'prefix', 'prompt' work)."""
    from softprompt.methods import CONFIGS, canonical

    name = canonical(method)
    if name not in METHODS:
        raise Seq2SeqError(f"method {name!r} is not available for encoder-decoder models; "
                           f"choose one of {sorted(METHODS)}")
    if name == "prefix_tuning":
        return Seq2SeqPrefixTuning.create(model, tokenizer, Seq2SeqPrefixConfig(**options))
    return Seq2SeqPromptTuning.create(model, tokenizer, CONFIGS[name](**options))
