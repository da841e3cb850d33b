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

from softprompt.core.geometry import BaseModelError, freeze


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
    from softprompt.core.extras import require

    PeftModel = require("peft", "lora", "a LoRA adapter (--lora)").PeftModel
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


def load_base_with_lora(base=None, lora: str | os.PathLike | None = None, merge: bool = True, device=None,
                        dtype=None, quantize=None):
    """`load_base(base, ...)`, then `apply_lora` when `lora` is given. Returns `(model, tokenizer)`.
    The adapter is applied to the float32 weights on the CPU, and only then is the model cast,
    quantized and moved (so its fingerprint is the float32 adapted model's, whatever the precision)."""
    from softprompt.core.device import resolve
    from softprompt.io.load import load_base, place

    if lora is None:
        return load_base(base, dtype=dtype, device=device, quantize=quantize)
    from softprompt.core.extras import require

    require("peft", "lora", "a LoRA adapter (--lora)")  # before the base loads: the refusal comes at once
    where = resolve(device, dtype, quantize)
    model, tok = load_base(base, dtype="float32", device="cpu", quantize="none")
    model = apply_lora(model, lora, merge=merge)
    return place(model, where, tok), tok


def refusal_hint(card: dict, lora: str | os.PathLike | None, merge: bool = True) -> str:
    """Advice for an artifact refused for its base fingerprint, from its card's base name ("BASE",
    "BASE+lora:DIR" or "BASE+lora:DIR (unmerged)") against how the model was loaded (`lora`, `merge`).
    The fingerprint decides the refusal; this only words what to do. Merged and unmerged LoRA are
    different fingerprints (merged weights vs base weights plus lora_A/lora_B), hence the last case."""
    name = str((card.get("base_model") or {}).get("name") or "")
    if "+lora:" not in name:
        return ("it was trained on the bare base model, not the LoRA-adapted one: drop --lora"
                if lora is not None else "")
    adapter = name.split("+lora:", 1)[1]
    unmerged = adapter.endswith(" (unmerged)")
    adapter = adapter.removesuffix(" (unmerged)")
    if lora is None:
        return (f"it was trained on a LoRA-adapted base: pass --lora {adapter}"
                + (" --no-merge-lora" if unmerged else ""))
    if unmerged == merge:
        return (f"it was trained with the LoRA adapter {'kept unmerged' if unmerged else 'merged'}: "
                + ("add --no-merge-lora" if unmerged else "drop --no-merge-lora"))
    return f"it was trained on another LoRA-adapted base ({name}): pass --lora with that adapter"


def load_prompt(adapter, model, lora=None, merge: bool = True, allow_other_base: bool = False):
    """`load_artifact(adapter, model)`, with a refusal for the base fingerprint that also says which
    --lora / --no-merge-lora the artifact needs (`lora`, `merge`: how `model` was loaded)."""
    from softprompt.io.artifact import ArtifactError, load_artifact, read_card

    try:
        return load_artifact(adapter, model, allow_other_base=allow_other_base)
    except ArtifactError as e:
        if "was made for base model" not in str(e):
            raise
        try:
            hint = refusal_hint(read_card(adapter), lora, merge)
        except Exception:  # the card was readable a moment ago; never hide the refusal itself
            hint = ""
        if not hint:
            raise
        raise ArtifactError(f"{e}; {hint}") from e
