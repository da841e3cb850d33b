"""Prefixes on top of LoRA: apply a PEFT LoRA adapter to a frozen base model, merged or not.

Domain adaptation (a LoRA adapter) and per-task behaviour (a prefix or prompt) combine: train
the prompt on the LoRA-adapted model. The artifact's base fingerprint is the adapted model's
(merged: the merged weights; unmerged: the base weights plus every `lora_A`/`lora_B` tensor, as
they appear in the state dict), so the prompt is refused on the bare base, as it should be.

Only safetensors adapters are read (`adapter_model.safetensors`); a pickled `adapter_model.bin`
is refused, never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

from .models import BaseModelError, freeze


def apply_lora(model, adapter_dir: str | os.PathLike, merge: bool = True):
    """Apply the PEFT LoRA adapter in `adapter_dir` to `model` and return the adapted, frozen model.

    merge=True folds the LoRA deltas into the weights (`merge_and_unload`: a plain model, no extra
    cost per token). merge=False keeps the LoRA layers (the returned module is the PeftModel's
    underlying transformers model, with LoRA layers injected and active).
    `model` is modified in place (PEFT injects into it); load a fresh copy for the bare base.
    The returned model's `name_or_path` is `BASE+lora:DIR` (the artifact card's base name).
    """
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise BaseModelError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        if (path / "adapter_model.bin").exists():
            raise BaseModelError(f"{path} holds only a pickled adapter_model.bin, which softprompt never loads; "
                                 "re-save the adapter with safetensors (save_pretrained(..., safe_serialization=True))")
        raise BaseModelError(f"{path} has no adapter_model.safetensors")
    import json

    cfg = json.loads((path / "adapter_config.json").read_text())
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise BaseModelError(f"{path} is a {cfg.get('peft_type')} adapter, not LoRA; --lora takes a LoRA adapter "
                             "(prompt/prefix adapters go in --adapter)")
    from peft import PeftModel

    base_name = getattr(model, "name_or_path", "") or ""
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BaseModelError(f"cannot apply the LoRA adapter {path} to {base_name!r}: {e}") from e
    adapted = peft_model.merge_and_unload() if merge else peft_model.base_model.model
    if hasattr(adapted, "_softprompt_fingerprint"):  # the weights changed: never reuse a cached fingerprint
        del adapted._softprompt_fingerprint
    adapted.name_or_path = f"{base_name}+lora:{path}" + ("" if merge else " (unmerged)")
    return freeze(adapted)


def load_base_with_lora(base=None, lora: str | os.PathLike | None = None, merge: bool = True, **kwargs):
    """`load_base(base, **kwargs)`, then `apply_lora` when `lora` is given. Returns `(model, tokenizer)`."""
    from .models import load_base

    model, tok = load_base(base, **kwargs)
    if lora is not None:
        model = apply_lora(model, lora, merge=merge)
    return model, tok
