"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190): learned keys and values at every layer.

The prefix is `(L, 2, H_kv, P, D)`: grouped-query models get `num_key_value_heads` heads.

Two parameterizations, the same thing at inference:
  direct        the prefix tensor itself is the parameter;
  reparam MLP   prefix = base + MLP(E), E = Embedding(P, kv_dim), MLP = Linear(kv_dim, k) -> Tanh
                -> Linear(k, L*2*kv_dim), k = projection_dim (512 as in Li & Liang). Li & Liang
                found direct optimization unstable; the MLP is training-only and export writes the
                final K/V, so an artifact never carries it.

Initializations:
  random  direct: N(0, 1) entries (PEFT's default); MLP: PyTorch's default layer init.
  text    the frozen model's own K/V over a string (Li & Liang's "activations of real words"):
          the compile step of prompt tuning run on real token embeddings. With the MLP, the text
          K/V is the fixed `base` and the last Linear starts at zero, so training starts exactly
          at the text prefix.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from softprompt.core.geometry import Geometry, geometry
from softprompt.hf.prefix import compile_ids, prefixed_forward
from softprompt.methods.base import KVPrefix, PromptMethod, check_num_virtual_tokens, resolved, seeded
from softprompt.methods.config import PREFIX_TUNING_INITS as INITS, PrefixTuningConfig  # noqa: F401
from softprompt.methods.prompt_tuning import repeat_to



class PrefixTuning(PromptMethod):
    method = "prefix_tuning"

    def __init__(
        self,
        geometry: Geometry,
        num_virtual_tokens: int,
        projection_dim: int = 0,
        prefix: torch.Tensor | None = None,
        config: dict | None = None,
    ):
        super().__init__(geometry, num_virtual_tokens)
        shape = geometry.prefix_shape(num_virtual_tokens)  # (L, 2, H, P, D)
        if prefix is not None and tuple(prefix.shape) != shape:
            raise ValueError(f"prefix has shape {tuple(prefix.shape)}, this model needs {shape}")
        init = torch.zeros(shape) if prefix is None else prefix.detach().clone().float()
        self.projection_dim = projection_dim
        self._config = dict(config or {})
        if projection_dim:
            g = geometry
            self.embedding = nn.Embedding(num_virtual_tokens, g.kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(g.kv_dim, projection_dim),
                nn.Tanh(),
                nn.Linear(projection_dim, g.num_layers * 2 * g.kv_dim),
            )
            self.register_buffer("base", init)  # (L, 2, H, P, D), fixed
        else:
            self.prefix = nn.Parameter(init)  # (L, 2, H, P, D)

    @classmethod
    @torch.no_grad()
    def create(cls, model, tokenizer=None, config: PrefixTuningConfig | None = None, **options) -> "PrefixTuning":
        cfg = resolved(config or PrefixTuningConfig(**options), "prefix_tuning", tokenizer)
        geo, P = geometry(model), cfg.num_virtual_tokens
        g = torch.Generator().manual_seed(cfg.seed)
        if cfg.init == "text":
            if tokenizer is None:
                raise ValueError("init='text' needs the tokenizer")
            ids = repeat_to(tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"], P)
            prefix = compile_ids(model, ids).float().cpu()  # float32 whatever the base
        elif cfg.projection_dim:
            prefix = None
        else:
            prefix = torch.randn(geo.prefix_shape(P), generator=g)
        config = {k: v for k, v in asdict(cfg).items() if v is not None}
        with seeded(cfg.seed):  # the MLP's default init
            module = cls(geo, P, cfg.projection_dim, prefix, config)
        if cfg.projection_dim and cfg.init == "text":
            nn.init.zeros_(module.transform[2].weight)
            nn.init.zeros_(module.transform[2].bias)
        return module

    @classmethod
    def from_kv(cls, geometry: Geometry, kv: torch.Tensor, config: dict | None = None, projection_dim: int = 0,
                seed: int = 0) -> "PrefixTuning":
        """A prefix that starts at given keys and values `(L, 2, H, P, D)` (say, the compiled K/V of
        a real text: softprompt/loops/distill.py). Direct: `kv` is the parameter's start. With the
        MLP: `kv` is the fixed base and the last Linear starts at zero (as with init='text'), so
        training starts exactly at `kv`. `config`: what the card records beside the shape."""
        P = int(kv.shape[3])
        with seeded(seed):  # the MLP's default init
            module = cls(geometry, P, projection_dim, kv.detach().float().cpu(),
                         dict(config or {}, projection_dim=projection_dim, seed=seed))
        if projection_dim:
            nn.init.zeros_(module.transform[2].weight)
            nn.init.zeros_(module.transform[2].bias)
        return module

    def kv(self) -> torch.Tensor:
        """The prefix `(L, 2, H, P, D)` (through the MLP when there is one; differentiable)."""
        if not self.projection_dim:
            return self.prefix
        g, P = self.geometry, self.num_virtual_tokens
        out = self.transform(self.embedding.weight)  # (P, L*2*H*D)
        out = out.view(P, g.num_layers, 2, g.num_key_value_heads, g.head_dim).permute(1, 2, 3, 0, 4)
        return self.base + out  # (L, 2, H, P, D)

    def forward(self, model, input_ids, attention_mask, **kwargs):
        kwargs.setdefault("use_cache", False)
        return prefixed_forward(model, input_ids, attention_mask, [self.kv()], **kwargs)

    def to_kv_prefix(self, model) -> KVPrefix:
        p = next(model.parameters())
        with torch.no_grad():
            return KVPrefix.of(self.kv().detach().to(device=p.device, dtype=p.dtype))

    def export_tensors(self):
        return {"prefix": self.kv().detach().float().cpu().contiguous()}

    def config_dict(self):
        # An exported prefix has no MLP any more: it reloads as a direct prefix.
        return dict(self._config, num_virtual_tokens=self.num_virtual_tokens)

    @classmethod
    def expected_shapes(cls, geometry, num_virtual_tokens):
        return {"prefix": geometry.prefix_shape(num_virtual_tokens)}

    @classmethod
    def from_export(cls, geometry, config, tensors):
        prefix = tensors["prefix"]
        return cls(geometry, int(prefix.shape[3]), 0, prefix, dict(config, projection_dim=0))


def kv_to_peft(kv: torch.Tensor) -> torch.Tensor:
    """A prefix (L, 2, H, P, D) in PEFT's layout (P, L*2*H*D)."""
    L, two, H, P, D = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(P, L * two * H * D)


def peft_to_kv(emb: torch.Tensor, num_layers: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's (P, L*2*H*D) -> (L, 2, H, P, D) (PEFT views it as (P, L*2, H, D), layer-major)."""
    P = emb.shape[0]
    return emb.reshape(P, num_layers, 2, num_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
