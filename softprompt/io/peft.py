"""PEFT interop: read and write PEFT's prompt-learning adapter directories.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with a single
tensor `prompt_embeddings`:
  PROMPT_TUNING, P_TUNING   (P, d)              the virtual-token input embeddings (for P-tuning, the
                                                encoder's output: PEFT saves it that way too)
  PREFIX_TUNING             (P, L*2*H_kv*D)     per virtual token, layers x (key, value) x heads x dim
Pickled `adapter_model.bin` files are refused: we never unpickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softprompt.core.atomic import fsync_write, staged_dir
from softprompt.core.geometry import geometry
from softprompt.families import FAMILIES, family_named, family_of
from softprompt.methods import PromptMethod
from softprompt.methods.prefix_tuning import kv_to_peft, peft_to_kv  # noqa: F401  (PEFT's layout, named here too)

PEFT_TYPES = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}


class PeftFormatError(ValueError):
    """A PEFT adapter we cannot use; the message says why."""


def is_peft_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def import_peft(path: str | os.PathLike, model) -> PromptMethod:
    """A PEFT prompt-tuning, P-tuning or prefix-tuning adapter as one of our prompts for `model`."""
    path = Path(path)
    try:
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PeftFormatError(f"{path}/adapter_config.json cannot be read as JSON: {e}") from e
    peft_type = cfg.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise PeftFormatError(f"{path}: PEFT type {peft_type!r} is not a prompt-learning method we import "
                              f"(supported: {', '.join(PEFT_TYPES)})")
    task_type = cfg.get("task_type") or "CAUSAL_LM"
    families = [family_named(name) for name in FAMILIES]
    owner = next((f for f in families if task_type in f.peft_task_types), None)
    if owner is None:
        raise PeftFormatError(f"{path}: task_type {task_type!r} is not supported; only "
                              f"{', '.join(t for f in families for t in f.peft_task_types)} adapters")
    base = family_of(model)
    if owner is not base:
        raise PeftFormatError(f"{path}: a {task_type} adapter is for an {owner.description} model, but this base is "
                              f"{base.description}; load it with the base model it was made for")
    tensor_file = path / "adapter_model.safetensors"
    if not tensor_file.is_file():
        if (path / "adapter_model.bin").exists():
            raise PeftFormatError(f"{path} holds a pickled adapter_model.bin, which softprompt never loads; "
                                  "re-save it with PEFT's save_pretrained(..., safe_serialization=True)")
        raise PeftFormatError(f"{path} has no adapter_model.safetensors")
    try:
        tensors = load_file(tensor_file)
    except Exception as e:
        raise PeftFormatError(f"{tensor_file} does not parse as safetensors ({e}); it may be truncated") from e
    if "prompt_embeddings" not in tensors:
        raise PeftFormatError(f"{tensor_file} has no 'prompt_embeddings' tensor (found {sorted(tensors)})")
    emb = tensors["prompt_embeddings"].float()
    try:
        prompt = base.import_peft(path, cfg, emb, model)  # the family's own layout
    except ValueError as e:
        raise PeftFormatError(str(e)) from e
    prompt.card = {"method": prompt.method, "num_virtual_tokens": prompt.num_virtual_tokens, "source": "peft",
                   "path": str(path), "model_family": base.name,
                   "base_model": {"name": cfg.get("base_model_name_or_path")}, "peft_config": cfg}
    return prompt


def export_peft(prompt: PromptMethod, path: str | os.PathLike, model, base_model_name_or_path: str | None = None) -> Path:
    """Write `prompt` as a PEFT adapter directory that `PeftModel.from_pretrained` loads (atomically)."""
    path = Path(path)
    geo = geometry(model)
    tensors = prompt.export_tensors()
    common = {
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
        "inference_mode": True,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "num_layers": geo.num_layers,
        "num_transformer_submodules": 1,
        "task_type": "CAUSAL_LM",
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    if prompt.method == "prefix_tuning":
        emb = kv_to_peft(tensors["prefix"])
        cfg = dict(common, peft_type="PREFIX_TUNING", num_attention_heads=geo.num_key_value_heads,
                   token_dim=geo.kv_dim, encoder_hidden_size=geo.kv_dim, prefix_projection=False)
    elif prompt.method == "prompt_tuning":
        emb = tensors["prompt_embeddings"]
        cfg = dict(common, peft_type="PROMPT_TUNING", num_attention_heads=geo.num_attention_heads,
                   token_dim=geo.hidden_size, prompt_tuning_init="RANDOM")
    elif prompt.method == "p_tuning":
        emb = tensors["prompt_embeddings"]
        cfg = dict(common, peft_type="P_TUNING", num_attention_heads=geo.num_attention_heads,
                   token_dim=geo.hidden_size, encoder_hidden_size=geo.hidden_size,
                   encoder_reparameterization_type="MLP", encoder_num_layers=2, encoder_dropout=0.0)
    else:  # pragma: no cover - every method we have is listed above
        raise PeftFormatError(f"cannot export method {prompt.method!r} to PEFT")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and any(path.iterdir()) and not is_peft_dir(path):
        raise PeftFormatError(f"{path} exists and is not a PEFT adapter directory; refusing to overwrite it")
    with staged_dir(path) as tmp:  # an existing adapter is kept until the new one is complete
        save_file({"prompt_embeddings": emb.float().contiguous()}, tmp / "adapter_model.safetensors")
        fsync_write(tmp / "adapter_config.json", json.dumps(cfg, indent=2).encode())
    return path
