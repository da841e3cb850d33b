"""Prompt tuning (Lester et al. 2021, arXiv 2104.08691): P learned input embeddings before the text.

Trainable: `prompt_embeddings` (P, d). At inference the soft prompt compiles to a KV prefix (one
pass of the frozen model), so serving pays nothing per request for it.

Initializations (Lester et al. find sampled vocabulary or label words beat random):
  random  N(0, s^2) with s the std of the embedding matrix (the scale real tokens have)
  vocab   P rows sampled from the embedding matrix (seeded)
  text    the embeddings of a string, repeated or cut to P tokens
  tokens  the embeddings of explicit token ids, repeated or cut to P

Residual reparameterization (Razdaibiedina et al. 2023, arXiv 2305.03937), `residual_dim` > 0:
the prompt trained is P' = P + LN(W_up ReLU(W_down P)), one bottleneck MLP of width residual_dim
shared by the P tokens, with a skip connection. The paper reports faster, steadier training and
less sensitivity to the learning rate and the prompt length. One departure: the LayerNorm's gain
starts at zero (the paper's starts at one), so training starts exactly at the init, as prefix
tuning's MLP does; at the scale of a 135M model's embeddings a unit-scale LayerNorm output would
bury a text init. Training only: export writes P' and the artifact reloads as a plain prompt.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from softprompt.core.geometry import Geometry, geometry
from softprompt.hf.prefix import token_embeddings
from softprompt.methods.base import InputPromptMethod, resolved, seeded
from softprompt.methods.config import PROMPT_TUNING_INITS as INITS, PromptTuningConfig  # noqa: F401



def repeat_to(ids: list[int], n: int) -> list[int]:
    """Repeat or cut a token list to exactly n ids."""
    if not ids:
        raise ValueError("cannot initialize from an empty token list")
    return (ids * (n // len(ids) + 1))[:n]


class Residual(nn.Module):
    """x -> x + LN(W_up ReLU(W_down x)) over each of the P rows (P, d) -> (P, d)."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.down = nn.Linear(d, width)
        self.up = nn.Linear(width, d)
        self.norm = nn.LayerNorm(d)
        nn.init.zeros_(self.norm.weight)  # starts as the identity: P' = P

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.up(torch.relu(self.down(x))))


class PromptTuning(InputPromptMethod):
    method = "prompt_tuning"

    def __init__(self, geometry: Geometry, prompt_embeddings: torch.Tensor, config: dict | None = None,
                 residual_dim: int = 0):
        super().__init__(geometry, int(prompt_embeddings.shape[0]))
        self.prompt_embeddings = nn.Parameter(prompt_embeddings.detach().clone().float())  # (P, d)
        self._config = dict(config or {})
        self.residual_dim = residual_dim
        if residual_dim:
            self.residual = Residual(self.prompt_embeddings.shape[1], residual_dim)

    @classmethod
    @torch.no_grad()
    def create(cls, model, tokenizer=None, config: PromptTuningConfig | None = None, **options) -> "PromptTuning":
        cfg = resolved(config or PromptTuningConfig(**options), "prompt_tuning", tokenizer)
        P = cfg.num_virtual_tokens
        table = model.get_input_embeddings().weight  # (V, d)
        g = torch.Generator().manual_seed(cfg.seed)
        if cfg.init == "random":
            init = torch.randn(P, table.shape[1], generator=g) * table.float().std()
        elif cfg.init == "vocab":
            rows = torch.randint(0, table.shape[0], (P,), generator=g)
            init = token_embeddings(model, rows.tolist())
        else:
            if cfg.init == "text":
                if tokenizer is None:
                    raise ValueError("init='text' needs the tokenizer")
                ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
            else:
                ids = list(cfg.init_tokens)
                bad = [i for i in ids if not 0 <= i < table.shape[0]]
                if bad:
                    raise ValueError(f"token ids {bad} are outside the vocabulary (size {table.shape[0]})")
            init = token_embeddings(model, repeat_to(ids, P))
        config = {k: v for k, v in asdict(cfg).items() if v is not None}
        with seeded(cfg.seed):  # the residual MLP's default init
            return cls(geometry(model), init, config, cfg.residual_dim)

    def virtual_embeddings(self) -> torch.Tensor:
        """The soft prompt (P, d): the parameter itself, or P' through the residual MLP."""
        if not self.residual_dim:
            return self.prompt_embeddings
        return self.residual(self.prompt_embeddings)

    @classmethod
    def from_export(cls, geometry, config, tensors):
        # An exported prompt has no MLP any more (it holds P'): it reloads as a plain prompt.
        return cls(geometry, tensors["prompt_embeddings"], dict(config, residual_dim=0) if config.get("residual_dim")
                   else config)
