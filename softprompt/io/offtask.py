"""An artifact's off-task summary on disk: a safetensors file beside the artifact, named by its card.

The summary (core/offtask.py; tens of KB) is too large for the card (MAX_CARD_BYTES, shown whole
by the API) and cannot join the artifact's tensors (their checksum and shapes are the artifact's
identity), so it is a file of its own:

    DIR/offtask.safetensors          card field  "offtask": "DIR/offtask.safetensors"
    F.offtask.safetensors            card field  "offtask": "F.offtask.safetensors"

The card's value is read as its `plot` and `inspection` are (card_schema.card_file_path): relative
to the artifact's folder and only beside or inside the artifact, so a card never makes anyone read
elsewhere. In a store, a summary is a store file `files/<sha>.safetensors` (the store copies a
card's attachments there; see read_summary for what it needs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from softprompt.core.atomic import write_file
from softprompt.core.offtask import MAX_BYTES, OffTaskError, OffTaskSummary
from softprompt.io.artifact import CARD_FILE, META_KEY, read_artifact
from softprompt.io.card_schema import card_file_path

CARD_KEY = "offtask"
FILE_NAME = "offtask.safetensors"


def summary_file(artifact: str | os.PathLike) -> Path:
    """Where an artifact's summary goes: inside a directory artifact, beside a single-file one."""
    path = Path(artifact)
    return path / FILE_NAME if path.is_dir() else path.with_name(path.name.removesuffix(".safetensors") + "." + FILE_NAME)


def write_summary(artifact: str | os.PathLike, summary: OffTaskSummary) -> Path:
    """Write `summary` beside `artifact` (either form) and name it in the card; the file first, so a
    card never names a summary that is not whole. The tensors (and their checksum) are not touched.
    Returns the summary's path."""
    path = Path(artifact)
    card, blob = read_artifact(path)
    dest = summary_file(path)
    write_file(dest, summary.to_bytes())
    card = dict(card, **{CARD_KEY: f"{path.name}/{FILE_NAME}" if path.is_dir() else dest.name})
    if path.is_dir():
        write_file(path / CARD_FILE, json.dumps(card, indent=2).encode())
    else:  # the single-file form: the card is the header's metadata; safetensors' layout keeps the data bytes
        write_file(path, st_save(st_load(blob), metadata={META_KEY: json.dumps(card)}))
    return dest


def read_summary(source, card: dict | None = None) -> OffTaskSummary | None:
    """The off-task summary of what a task resolves to, or None where it has none.

    source: an artifact path (its card's `offtask`), a store entry (a `files/...` value under its
    store's root, where the store keeps attachments), or an object carrying `.offtask` (a
    PromptMethod in memory that was given one). A summary that is named but damaged raises
    OffTaskError (the caller decides: the engine logs it and serves the task unguarded)."""
    held = getattr(source, "offtask", None)
    if isinstance(held, OffTaskSummary):
        return held
    if card is None:
        return None
    value = card.get(CARD_KEY)
    if not isinstance(value, str) or not value.endswith(".safetensors"):
        return None
    path = _store_file(source, value) if hasattr(source, "sha256") and hasattr(source, "store") else \
        card_file_path(source, value) if isinstance(source, (str, os.PathLike)) else None
    if path is None:
        return None
    if path.stat().st_size > MAX_BYTES:
        raise OffTaskError(f"{path} is {path.stat().st_size} bytes, over the limit of {MAX_BYTES}")
    return OffTaskSummary.from_bytes(path.read_bytes(), str(path))


def _store_file(entry, value: str) -> Path | None:
    """A store entry's attachment `files/<name>`, confined to the store's files/ folder."""
    root = getattr(entry.store, "root", None)
    if root is None or not value.startswith("files/"):
        return None
    files = (Path(root) / "files").resolve()
    try:
        real = (Path(root) / value).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    return real if real.parent == files and real.is_file() else None

