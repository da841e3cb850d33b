"""The small protocol every prompt method implements, so shared code never asks which it holds.

Training side: `forward(model, input_ids, attention_mask)` runs the frozen model with the method's
trainable tensors entering where the method puts them (input embeddings or per-layer K/V).
Serving side: `to_kv_prefix(model)` gives the `Prefix` that replaces the method at inference: for
a decoder a `KVPrefix`, the `(L, 2, H_kv, P, D)` tensor itself; a family whose prompts enter in
several places has its own `Prefix` (an encoder-decoder's `Seq2SeqPrefix`). Storage: `export_tensors()` / `from_export()` (what the artifact holds; any
training-only reparameterization is gone) and `config_dict()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from softprompt.core.geometry import Geometry
from softprompt.hf.prefix import positions_after_prefix
from softprompt.methods.config import check_num_virtual_tokens  # noqa: F401  (the config boundary's check)


@contextmanager
def seeded(seed: int):
    """Layers built inside take their default init from a generator seeded with `seed` (torch's
    layer inits draw from the global generator), and the global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def resolved(cfg, method: str, tokenizer):
    """The config with its open defaults filled: the init a method starts from when none was named
    (the config's own `default_init`) and the text a text init reads (softprompt/core/defaults.py)."""
    from dataclasses import replace

    from softprompt.core.defaults import INIT_TEXT

    init = cfg.init if cfg.init is not None else cfg.default_init(tokenizer is not None)
    return replace(cfg, init=init, init_text=cfg.init_text or (INIT_TEXT if init == "text" else None))


class Prefix:
    """What every prompt compiles to for serving, whatever the family: the engine reads `kv()`, the
    prefix cache counts `nbytes`, a task moves it with `to(device, dtype)`, and the store keeps its
    compiled form as `tensors()` (named tensors), read back by the family's `load_prefix`."""

    def kv(self):
        """What the family's engine reads (a decoder's: the plain `(L, 2, H_kv, P, D)` tensor)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def to(self, device=None, dtype=None) -> "Prefix":
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The prefix as named tensors, for the store's compiled form."""
        raise NotImplementedError


class KVPrefix(torch.Tensor, Prefix):
    """A decoder's prefix: the `(L, 2, H_kv, P, D)` tensor itself (a tensor subclass, as
    `nn.Parameter` is: no `__torch_function__`, so every op on it returns a plain tensor and the
    engine's loop pays nothing for it). Keys are stored as attention sees them (after RoPE)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def of(kv: torch.Tensor) -> "KVPrefix":
        """`kv` as a KVPrefix, sharing its storage (no copy); detached."""
        if type(kv) is KVPrefix:
            return kv
        return torch.Tensor._make_subclass(KVPrefix, kv.detach(), False)

    def __new__(cls, kv: torch.Tensor):
        return cls.of(kv)

    def kv(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    def to(self, *args, **kwargs) -> "KVPrefix":
        out = torch.Tensor.to(self, *args, **kwargs)
        return self if out is self else KVPrefix.of(out.contiguous())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"kv": self.kv()}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> "KVPrefix":
        return KVPrefix.of(tensors["kv"])

    def __reduce_ex__(self, proto):
        return KVPrefix.of, (self.kv(),)

    def __deepcopy__(self, memo):
        return KVPrefix.of(self.kv().clone())

    def __repr__(self) -> str:
        return f"KVPrefix(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class PromptMethod(nn.Module, ABC):
    method: ClassVar[str]

    def __init__(self, geometry: Geometry, num_virtual_tokens: int):
        super().__init__()
        check_num_virtual_tokens(num_virtual_tokens)
        self.geometry = geometry
        self.num_virtual_tokens = num_virtual_tokens

    # --- training side -----------------------------------------------------------------------
    @abstractmethod
    def forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        """Frozen model over a left-padded batch (B, T) with this prompt; logits are (B, T, V)."""

    # --- serving side ------------------------------------------------------------------------
    @abstractmethod
    def to_kv_prefix(self, model) -> Prefix:
        """The prefix that stands for this prompt at inference, on the model's device and in its
        dtype (a decoder's: the `KVPrefix` `(L, 2, H_kv, P, D)`)."""

    # --- storage -----------------------------------------------------------------------------
    @abstractmethod
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors an artifact stores (contiguous, detached, on CPU)."""

    @abstractmethod
    def config_dict(self) -> dict:
        """JSON-able options that, with the exported tensors, rebuild this prompt."""

    @classmethod
    @abstractmethod
    def expected_shapes(cls, geometry: Geometry, num_virtual_tokens: int) -> dict[str, tuple[int, ...]]:
        """Shapes `export_tensors()` has for a model of this geometry."""

    @classmethod
    @abstractmethod
    def from_export(cls, geometry: Geometry, config: dict, tensors: dict[str, torch.Tensor]) -> "PromptMethod":
        """Rebuild (for inference or further training) from an artifact's tensors."""

    # --- the PEFT-style API ------------------------------------------------------------------
    def attach_base(self, model, save=None) -> None:
        """Remember (weakly: the prompt never keeps a model alive) the base this prompt belongs to,
        so `save_pretrained(path)` can record its fingerprint without being handed the model, and the
        function that writes the artifact (`softprompt.io.artifact.save_artifact`: methods sit below
        the artifact format, so the API that made the prompt hands it down)."""
        import weakref

        self.__dict__["_base_ref"] = weakref.ref(model)  # a plain attribute, not a registered submodule
        if save is not None:
            self.__dict__["_save"] = save

    def save_pretrained(self, path, model=None, **card):
        """Write this prompt as an artifact (a directory, or one `*.safetensors` file) for `model`
        (default: the base it was created or loaded with); `card`: metrics=, dataset=, ...
        An earlier artifact at `path` is replaced atomically; anything else there is refused."""
        ref = self.__dict__.get("_base_ref")
        model = model if model is not None else (ref() if ref is not None else None)
        if model is None:
            raise ValueError("save_pretrained needs the base model: prompt.save_pretrained(path, model)")
        save = self.__dict__.get("_save")
        if save is None:
            raise ValueError("save_pretrained saves prompts made by sp.create or sp.load; save this one with "
                             "softprompt.io.artifact.save_artifact(prompt, path, model)")
        return save(self, path, model, **card)

    # --- sizes -------------------------------------------------------------------------------
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def artifact_bytes(self) -> int:
        """Bytes of tensor data in the exported artifact (the card and header add ~1 KB)."""
        return sum(t.numel() * t.element_size() for t in self.export_tensors().values())

    def sizes(self, model) -> dict:
        base = sum(p.numel() for p in model.parameters())
        trainable = self.num_trainable_parameters()
        return {
            "method": self.method,
            "num_virtual_tokens": self.num_virtual_tokens,
            "trainable_parameters": trainable,
            "total_parameters": base + trainable,
            "artifact_bytes": self.artifact_bytes(),
        }


class InputPromptMethod(PromptMethod):
    """A method whose trainable tensors end as P input embeddings before the text (prompt tuning,
    P-tuning): the shared forward, the compile step, and storage as `prompt_embeddings` (P, d)."""

    @abstractmethod
    def virtual_embeddings(self) -> torch.Tensor:
        """The soft prompt (P, d), differentiable."""

    def forward(self, model, input_ids, attention_mask, **kwargs):
        return soft_prompt_forward(model, self.virtual_embeddings(), input_ids, attention_mask, **kwargs)

    def to_kv_prefix(self, model) -> KVPrefix:
        from softprompt.hf.prefix import compile_embeddings

        with torch.no_grad():
            return KVPrefix.of(compile_embeddings(model, self.virtual_embeddings()))

    def export_tensors(self):
        with torch.no_grad():
            return {"prompt_embeddings": self.virtual_embeddings().detach().float().cpu().contiguous()}

    def config_dict(self):
        return dict(self._config, num_virtual_tokens=self.num_virtual_tokens)

    @classmethod
    def expected_shapes(cls, geometry, num_virtual_tokens):
        return {"prompt_embeddings": (num_virtual_tokens, geometry.hidden_size)}


def soft_prompt_forward(model, soft_prompt: torch.Tensor, input_ids, attention_mask, **kwargs):
    """Run the model with `soft_prompt` (P, d) placed before every row's text.

    Layout per row: [P virtual | pad | T_i tokens], positions 0..P-1 then P, P+1, ... counted
    over real tokens only, so left padding never shifts a row. Logits are returned for the real
    slots only: (B, T, V), aligned with `input_ids`.
    """
    B, T = input_ids.shape
    P = soft_prompt.shape[0]
    emb = model.get_input_embeddings()(input_ids)  # (B, T, d)
    prompt = soft_prompt.to(emb.dtype).unsqueeze(0).expand(B, P, -1)  # (B, P, d)
    inputs_embeds = torch.cat([prompt, emb], dim=1)  # (B, P+T, d)
    ones = torch.ones(B, P, dtype=torch.long, device=input_ids.device)
    mask = torch.cat([ones, attention_mask.long()], dim=1)  # (B, P+T)
    pos_prompt = torch.arange(P, device=input_ids.device).expand(B, P)
    pos_text = positions_after_prefix(attention_mask, torch.full((B,), P, device=input_ids.device))
    position_ids = torch.cat([pos_prompt, pos_text], dim=1)  # (B, P+T)
    kwargs.setdefault("use_cache", False)
    keep = kwargs.pop("logits_to_keep", 0)
    out = model(
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids,
        logits_to_keep=keep if keep else T,
        **kwargs,
    )
    return out
