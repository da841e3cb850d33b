"""Artifacts: a task's prompt on disk, as safetensors plus a JSON card. Nothing is ever unpickled.

Two forms, the same content:
  DIR/                      a directory holding `adapter.safetensors` and `card.json`
  FILE.safetensors          one file; the card is the JSON string `softprompt_card` in the
                            safetensors metadata

The card records what the tensors are (method, shapes, dtype, num_virtual_tokens, config), what
they are for (the base model's name, geometry and fingerprint), and how to trust them
(`tensor_sha256`: sha256 of the safetensors data section, i.e. of the tensor bytes, which is the
same in both forms). Writes are atomic: everything is written under a temporary name, flushed,
and renamed into place, so a crash never leaves something that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from softprompt import __version__
from softprompt.core.atomic import fsync_write, staged_dir, write_file
from softprompt.core.geometry import model_fingerprint
from softprompt.families import card_family, family_of
from softprompt.io.card_schema import CardError, check_card_fields
from softprompt.methods import METHODS, PromptMethod

FORMAT = "softprompt-artifact"
FORMAT_VERSION = 1
TENSOR_FILE = "adapter.safetensors"
CARD_FILE = "card.json"
META_KEY = "softprompt_card"


class ArtifactError(ValueError):
    """An artifact cannot be written or used; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------------------------
# Writing

def data_section(blob: bytes) -> bytes:
    """The tensor bytes of a serialized safetensors blob (after the 8-byte length and JSON header)."""
    if len(blob) < 8:
        raise ArtifactError("tensor file is truncated (shorter than a safetensors header)")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ArtifactError("tensor file is truncated (header runs past the end of the file)")
    return blob[8 + n:]



def make_card(prompt: PromptMethod, model, tensors: dict[str, torch.Tensor], *, metrics=None, dataset=None,
              base_name: str | None = None, extra: dict | None = None) -> dict:
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": prompt.method,
        "model_family": family_of(model).name,  # loading refuses a base of another family
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "config": prompt.config_dict(),
        "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for k, t in tensors.items()},
        "dtype": "float32",
        "base_model": {
            "name": base_name or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", ""),
            "fingerprint": model_fingerprint(model),
            "geometry": family_of(model).geometry(model).to_dict(),
        },
        "library_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics": dict(metrics or {}),
        "dataset": dataset,
    }
    card.update(getattr(prompt, "card_extra", None) or {})  # a classifier's labels and head kind
    card.update(extra or {})
    return card


def _is_artifact_dir(path: Path) -> bool:
    return path.is_dir() and (not any(path.iterdir()) or (path / CARD_FILE).exists())


def save_artifact(prompt: PromptMethod, path: str | os.PathLike, model, *, metrics=None, dataset=None,
                  base_name: str | None = None, extra: dict | None = None) -> Path:
    """Write `prompt` for `model` to `path` (a directory, or a single `*.safetensors` file).

    Returns the path. An existing artifact at `path` is replaced atomically; any other existing
    file or non-empty directory is refused rather than overwritten.
    """
    path = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in prompt.export_tensors().items()}
    data = data_section(st_save(tensors))
    card = make_card(prompt, model, tensors, metrics=metrics, dataset=dataset, base_name=base_name, extra=extra)
    card["tensor_sha256"] = hashlib.sha256(data).hexdigest()
    card["bytes"] = len(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        if path.is_dir():
            raise ArtifactError(f"{path} is a directory; give a new file name or a directory path without .safetensors")
        write_file(path, st_save(tensors, metadata={META_KEY: json.dumps(card)}))
        return path
    if path.exists() and not _is_artifact_dir(path):
        raise ArtifactError(f"{path} exists and is not a softprompt artifact; refusing to overwrite it. "
                            "Choose a new path or remove it first.")
    with staged_dir(path) as tmp:
        fsync_write(tmp / TENSOR_FILE, st_save(tensors))
        fsync_write(tmp / CARD_FILE, json.dumps(card, indent=2).encode())
    return path


# --------------------------------------------------------------------------------------------
# Reading

def read_raw(path: Path) -> tuple[dict, bytes]:
    """(card, safetensors blob) from either form, with no check beyond parsing."""
    if not path.exists():
        raise ArtifactError(f"no artifact at {path}: the path does not exist")
    if path.is_dir():
        card_path, tensor_path = path / CARD_FILE, path / TENSOR_FILE
        if not card_path.is_file():
            raise ArtifactError(f"{path} has no {CARD_FILE}: it is not a softprompt artifact "
                                "(a PEFT adapter directory holds adapter_config.json instead)")
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{card_path} is not valid JSON ({e}); the artifact is damaged: re-export it") from e
        if not tensor_path.is_file():
            raise ArtifactError(f"{path} has a card but no {TENSOR_FILE}; the artifact is incomplete: re-export it")
        return card, tensor_path.read_bytes()
    blob = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n].decode("utf-8"))
        card = json.loads(header["__metadata__"][META_KEY])
    except Exception as e:
        raise ArtifactError(f"{path} is not a softprompt artifact file (no readable card in its safetensors "
                            f"header: {type(e).__name__}); it may be truncated or another kind of file") from e
    return card, blob


def read_card(path: str | os.PathLike) -> dict:
    """The card of an artifact, checked for format and version (tensors not loaded)."""
    card, _ = read_raw(Path(path))
    check_card(card, Path(path))
    return card


def read_artifact(path: str | os.PathLike) -> tuple[dict, bytes]:
    """(card, safetensors blob) of an artifact in either form, its card checked against the schema
    (tensors are checked by `verified_tensors`). What the store and classifiers read through."""
    path = Path(path)
    card, blob = read_raw(path)
    check_card(card, path)
    return card, blob


def check_card(card: dict, path: Path) -> None:
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ArtifactError(f"{path}: the card's format is {card.get('format') if isinstance(card, dict) else card!r}, "
                            f"not {FORMAT!r}; this is not a softprompt artifact")
    version = card.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{path}: unknown artifact format version {version!r}; the card is damaged: re-export it")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version} was written by a newer softprompt "
                            f"({card.get('library_version')}); this is {__version__}, which reads up to version "
                            f"{FORMAT_VERSION}: upgrade softprompt")
    method = card.get("method")
    # a classifier may be its head alone, with no prompt: its method then names the classifier (io/classifier.py)
    prompt_less = card.get("task") == "classify" and card.get("num_virtual_tokens") == 0
    if not isinstance(method, str) or (method not in METHODS and not prompt_less):
        raise ArtifactError(f"{path}: unknown method {method!r}; this softprompt knows "
                            f"{', '.join(sorted(METHODS))}: upgrade softprompt or check the card")
    try:
        check_card_fields(card)
    except CardError as e:
        raise ArtifactError(f"{path}: {e}; the card is damaged or hand-edited: re-export the artifact") from None


def verified_tensors(path: Path, card: dict, blob: bytes, model, allow_other_base: bool = False) -> dict:
    """The tensors of an artifact read by `read_raw`, once its checksum holds and its base-model
    fingerprint is `model`'s (unless `allow_other_base`); every loader of an artifact goes through here."""
    try:
        data = data_section(blob)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}; restore it or re-export it") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.get("tensor_sha256"):
        raise ArtifactError(f"{path}: the tensor file is truncated or altered (sha256 {digest[:12]}... does not "
                            f"match the card's {str(card.get('tensor_sha256'))[:12]}...); restore it or re-export it")
    try:
        tensors = st_load(blob)
    except Exception as e:
        raise ArtifactError(f"{path}: the tensor file does not parse ({e}); restore it or re-export it") from e
    base = card.get("base_model") or {}
    fp = model_fingerprint(model)
    if base.get("fingerprint") and base["fingerprint"] != fp and not allow_other_base:
        raise ArtifactError(
            f"{path} was made for base model {base.get('name')!r} (fingerprint {base['fingerprint']}), "
            f"but the loaded model {getattr(model, 'name_or_path', '')!r} has fingerprint {fp}. Load it with the "
            "base model it was trained on (--base PATH), or pass allow_other_base=True if you know the weights fit")
    return tensors


def load_artifact(path: str | os.PathLike, model, *, allow_other_base: bool = False) -> PromptMethod:
    """Load an artifact (ours, either form, or a PEFT adapter directory) for `model`.

    Refuses, with a message saying what to do: a missing or damaged card, an unknown method or
    format version, a truncated or altered tensor file (checksum), shapes that do not fit the
    model, and a different base model (fingerprint) unless `allow_other_base`.
    The returned module carries the card as `.card`.
    """
    path = Path(path)
    if path.is_dir() and not (path / CARD_FILE).exists() and (path / "adapter_config.json").exists():
        from softprompt.io.peft import import_peft

        return import_peft(path, model)
    card, blob = read_raw(path)
    check_card(card, path)
    if (card.get("classifier") or {}).get("kind") == "head":  # a verbalizer's tensors are a plain prompt
        raise ArtifactError(f"{path} is a classifier (an encoder with a head, labels "
                            f"{card['classifier'].get('labels')}), not a prompt for generation: use `softprompt eval "
                            "--adapter` on classification data, POST /v1/classify, or softprompt.classify.load_classifier")
    family = card_family(card)
    fam = family_of(model)
    base_family = fam.name
    if not fam.accepts_card_family(family):
        raise ArtifactError(f"{path} is a prompt for a {family} model ({(card.get('base_model') or {}).get('name')!r}), "
                            f"but the loaded base {getattr(model, 'name_or_path', '')!r} is {base_family}: load it "
                            "with the base model it was trained on (--base PATH)")
    tensors = verified_tensors(path, card, blob, model, allow_other_base)
    base = card.get("base_model") or {}
    cls, geo, shape_opts = fam.methods().get(card["method"]), fam.geometry(model), fam.shape_options(card)
    if cls is None:
        raise ArtifactError(f"{path}: method {card['method']!r} is not available for {base_family} models")
    want = {k: tuple(v) for k, v in cls.expected_shapes(geo, int(card["num_virtual_tokens"]), **shape_opts).items()}
    have = {k: tuple(t.shape) for k, t in tensors.items()}
    if want != have:
        raise ArtifactError(
            f"{path}: tensor shapes {have} do not fit this model, which needs {want} "
            f"({geo.num_layers} layers, {geo.num_key_value_heads} KV heads of dim {geo.head_dim}, hidden "
            f"{geo.hidden_size}); it was made for {base.get('name')!r} {base.get('geometry')}: load it on that model")
    prompt = cls.from_export(geo, card.get("config") or {}, tensors)
    prompt.card = card
    return prompt
