"""Where a prefix comes from, read from what already exists and nothing else: the artifact's card,
the training run's `run.json` and last metrics row (when the artifact is a run's OUT/best or
OUT/last), the store's index row and approval (when audited by TASK[@VERSION]), and the training data
file when it can still be read. A field nobody recorded is shown as NOT_RECORDED, never guessed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

NOT_RECORDED = "not recorded"
SAMPLE_ROWS = 3
SAMPLE_CHARS = 300  # a sample row is shown cut to this many characters
DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".tsv")


def _or(value):
    return NOT_RECORDED if value in (None, "", {}, []) else value


def data_file(path) -> dict:
    """Path, row count, sha256 of the bytes and a few rows of a data file; only the path (and why)
    when it cannot be read. `hf:` specs are named, not downloaded."""
    from softprompt.loops.data import DataError, data_rows

    info = {"path": _or(path)}
    if not isinstance(path, str) or not path:
        return info
    p = Path(path)
    if p.suffix.lower() not in DATA_SUFFIXES and not path.startswith("hf:"):
        # the card is the artifact maker's data: its path is read only when it names a data file, so a
        # card cannot make the report quote some other file of the reviewer's machine
        return info | {"readable": False, "note": f"not read: {p.suffix or 'no suffix'} is no training data format"}
    if path.startswith("hf:") or not p.is_file():
        info["readable"] = False
        info["note"] = "a Hugging Face dataset (not downloaded)" if path.startswith("hf:") else "the file is not here"
        return info
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        rows, samples = 0, []
        for _, row in data_rows(p):
            rows += 1
            if len(samples) < SAMPLE_ROWS and not isinstance(row, Exception):
                text = json.dumps(row, ensure_ascii=False)
                samples.append(text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS - 3] + "...")
    except (OSError, DataError, UnicodeDecodeError) as e:
        return info | {"readable": False, "note": f"cannot be read: {e}"}
    return info | {"readable": True, "rows": rows, "sha256": h.hexdigest(), "bytes": p.stat().st_size,
                   "sample_rows": samples}


def run_record(artifact: Path | None) -> tuple[dict | None, dict | None]:
    """(run.json, last metrics row) of the run that wrote `artifact` (RUN/best or RUN/last), if any."""
    from softprompt.io.card import _run_info  # the model card's own reader: one definition of a run

    return _run_info(artifact) if artifact is not None else (None, None)


def provenance(card: dict, artifact: Path | None, store_row: dict | None) -> dict:
    """The provenance section (module doc). `artifact`: the file audited when given as a path (None
    when it came from the store: a stored artifact has no run directory beside it)."""
    base = card.get("base_model") or {}
    run, last = run_record(artifact)
    run = run or {}
    train_path = card.get("dataset") if isinstance(card.get("dataset"), str) else None
    train_path = train_path or run.get("train_data") or run.get("data_path")
    steps = (card.get("metrics") or {}).get("trained_steps") or (run.get("train") or {}).get("steps")
    out = {
        "source": {"kind": "store" if store_row else ("PEFT adapter directory" if card.get("source") == "peft"
                                                      or "PEFT" in str(card.get("format")) else "artifact"),
                   "ref": f"{store_row['name']}@{store_row['version']}" if store_row else str(artifact)},
        "base_model": {"name": _or(base.get("name")), "fingerprint": _or(base.get("fingerprint")),
                       "geometry": _or(base.get("geometry"))},
        "method": _or(card.get("method")),
        "num_virtual_tokens": _or(card.get("num_virtual_tokens")),
        "tensors": _or(card.get("tensors")),
        "tensor_sha256": _or(card.get("tensor_sha256")),
        "options": _or(card.get("config")),
        "prompt_format": _or(card.get("prompt_format")),
        "training": {"hyperparameters": _or(run.get("train")), "steps": _or(steps),
                     "data_reading": _or(run.get("data")), "bad_rows": _or(run.get("bad_rows")),
                     "processes": _or(run.get("world"))},
        "training_data": data_file(train_path) if train_path else {"path": NOT_RECORDED},
        "held_out_data": _or(run.get("eval_data")),
        "metrics": _or(card.get("metrics")),
        "last_logged_row": _or(last),
        "created": _or(card.get("created")),
        "library_version": _or(card.get("library_version")),
    }
    if store_row:
        appr = store_row.get("approval") or {}
        out["published"] = {"store": _or(store_row.get("store")), "task": store_row["name"],
                            "version": store_row["version"], "added": _or(store_row.get("created")),
                            "sha256": _or(store_row.get("sha256")), "tags": _or(store_row.get("tags")),
                            "state": store_row.get("state") or "draft",
                            "decided_by": _or(appr.get("by_name") or appr.get("by")),
                            "decided_at": _or(appr.get("time")), "note": _or(appr.get("note")),
                            "signed": bool(appr.get("signed"))}
    else:
        out["published"] = {"store": NOT_RECORDED, "note": "audited from a file, not from the store: who published "
                            "it and when is recorded only when it is added to the store"}
    return out
