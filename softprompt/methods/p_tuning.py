"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385): virtual-token embeddings
produced by a prompt encoder, placed before the text.

  h = Embedding(P, d)                       trainable inputs of the encoder
  mlp:  e = Linear(d,k) ReLU Linear(k,k) ReLU Linear(k,d) (h)
  lstm: e = [Linear(2k,2k) ReLU Linear(2k,d)] (BiLSTM_2layers(h))
The encoder couples the virtual tokens during training; at export only `e` (P, d) is kept, so a
P-tuning artifact is served exactly like a prompt-tuning one (compiled to a KV prefix).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from softprompt.core.geometry import Geometry, geometry
from softprompt.methods.base import InputPromptMethod, check_num_virtual_tokens, seeded
from softprompt.methods.config import P_TUNING_ENCODERS as ENCODERS, PTuningConfig  # noqa: F401


class PTuning(InputPromptMethod):
    method = "p_tuning"

    def __init__(
        self,
        geometry: Geometry,
        num_virtual_tokens: int,
        encoder: str | None = PTuningConfig.encoder,
        encoder_hidden_size: int | None = None,
        prompt_embeddings: torch.Tensor | None = None,
        config: dict | None = None,
    ):
        """`encoder=None` with `prompt_embeddings`: a loaded artifact, the encoder's output only."""
        super().__init__(geometry, num_virtual_tokens)
        d, P = geometry.hidden_size, num_virtual_tokens
        k = encoder_hidden_size or d
        self.encoder = encoder
        self._config = dict(config or {})
        if encoder is None:
            if prompt_embeddings is None:
                raise ValueError("a P-tuning prompt without an encoder needs prompt_embeddings")
            self.prompt_embeddings = nn.Parameter(prompt_embeddings.detach().clone().float())  # (P, d)
            return
        self.embedding = nn.Embedding(P, d)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(d, k, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * k, 2 * k), nn.ReLU(), nn.Linear(2 * k, d))
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(d, k), nn.ReLU(), nn.Linear(k, k), nn.ReLU(), nn.Linear(k, d))
        else:
            raise ValueError(f"P-tuning encoder must be one of {ENCODERS}, got {encoder!r}")

    @classmethod
    def create(cls, model, tokenizer=None, config: PTuningConfig | None = None, **options) -> "PTuning":
        cfg = config or PTuningConfig(**options)
        config = {k: v for k, v in asdict(cfg).items() if v is not None}
        with seeded(cfg.seed):  # the encoder's layer inits
            return cls(geometry(model), cfg.num_virtual_tokens, cfg.encoder, cfg.encoder_hidden_size, None, config)

    def virtual_embeddings(self) -> torch.Tensor:
        """The encoder's output (P, d)."""
        if self.encoder is None:
            return self.prompt_embeddings
        h = self.embedding.weight.unsqueeze(0)  # (1, P, d)
        if self.encoder == "lstm":
            h = self.lstm_head(h)[0]  # (1, P, 2k)
        return self.mlp_head(h)[0]  # (P, d)

    @classmethod
    def from_export(cls, geometry, config, tensors):
        emb = tensors["prompt_embeddings"]
        # the encoder is gone after export; remember which one trained it
        trained_with = config.get("trained_with_encoder", config.get("encoder"))
        config = {k: v for k, v in config.items() if k not in ("encoder", "encoder_hidden_size")}
        return cls(geometry, int(emb.shape[0]), None, None, emb, dict(config, trained_with_encoder=trained_with))
