"""The model objects of `GET /v1/models` and `GET /v1/models/{model}`: OpenAI's fields (`id`,
`object`, `created`, `owned_by`) and vLLM's `max_model_len`, `root` and `parent`.

`max_model_len` means what it means in vLLM: the tokens one request may hold, prompt and completion
together. A task's P virtual tokens take the first P positions (the text comes after the prefix:
positions P, P+1, ...), so a task gets the base's context minus P; the base model gets its whole
context (the limit the engine enforces, serve/engine.py). It is None where the base has no fixed
context (T5's relative positions) or a task's P cannot be read.

`root` is the base model's id for every entry; `parent` is the base for a task (as vLLM says of a
LoRA adapter) and None for the base. `created` is when a task was added to the store (or trained,
for a task registered by path), and for the base model when its config.json was written (else when
the app was made): the same in every answer, and on every replica that loads the same files.
"""

from __future__ import annotations

import calendar
import time
from pathlib import Path


def model_object(model_id: str, base_id: str, created: int, context: int | None,
                 virtual_tokens: int | None = 0) -> dict:
    """One entry; `virtual_tokens` 0 for the base model, None when a task's P is unknown."""
    max_len = None if context is None or virtual_tokens is None else max(0, context - virtual_tokens)
    return {"id": model_id, "object": "model", "created": created, "owned_by": "softprompt",
            "root": base_id, "parent": None if model_id == base_id else base_id, "max_model_len": max_len}


def all_models(svc, base_time: int) -> list[dict]:
    """The base model first, then the engine's registered tasks, then the store's (latest versions),
    each name once. Reads the store's index only: no task file is opened. `base_time`: the base's
    `created` (base_created), also a task's where its time is unknown."""
    base, context = svc.config.base_model_id, context_of(svc.engine)
    out = [model_object(base, base, base_time, context)]
    seen = {base}
    for name in svc.engine.tasks.names():
        if name not in seen:
            seen.add(name)
            try:
                P, created = _of_source(svc.engine.tasks.task(name))
            except Exception:  # noqa: BLE001  one task that cannot be read must not fail the whole list
                P, created = None, None
            out.append(model_object(name, base, created or base_time, context, P))
    for row in (svc.store.ls() if svc.store is not None else []):
        if row["name"] not in seen:
            seen.add(row["name"])
            out.append(model_object(row["name"], base, _epoch(row.get("created")) or base_time, context,
                                    _count(row.get("num_virtual_tokens"))))
    return out


def one_model(svc, model_id: str, base_time: int) -> dict:
    """The entry for `model_id` (the base's id, a task `name` or `name@N`), resolved as a completion
    request resolves `model`: an unknown id is the same 404 `model_not_found` (Service.task_of)."""
    base, context = svc.config.base_model_id, context_of(svc.engine)
    task = svc.task_of(model_id)
    if task is None:
        return model_object(base, base, base_time, context)
    src = task.source
    P, created = _of_source(task)
    if svc.store is not None and hasattr(src, "sha256") and hasattr(src, "version"):  # a store entry
        from softprompt.store.core import StoreError

        try:  # its index row, as the list reads it (the time it was added, not trained)
            row = svc.store.show(f"{src.name}@{src.version}")
            P, created = _count(row.get("num_virtual_tokens")), _epoch(row.get("created"))
        except StoreError:  # the index is away (a shared store): what the card says
            pass
    return model_object(model_id, base, created or base_time, context, P)


def base_created(model, default: int) -> int:
    """When the base's files were written (its config.json's mtime, from the directory it was loaded
    from), or `default` for a model built in memory."""
    where = getattr(getattr(model, "config", None), "_name_or_path", None)
    try:
        return int((Path(where) / "config.json").stat().st_mtime) if where else default
    except (OSError, TypeError, ValueError):
        return default


def context_of(engine) -> int | None:
    """The positions the engine allows a request (prefix, prompt and new tokens), None if unbounded."""
    n = getattr(engine, "max_positions", None)
    return n if isinstance(n, int) and n > 0 else None


def _of_source(task) -> tuple[int | None, int | None]:
    """(P, created) of a task registered in the engine: an in-memory prompt knows its P; a path has
    its card (read once per content, serve/tasks.py)."""
    card = task.card or {}
    P = getattr(task.source, "num_virtual_tokens", None)
    return _count(P if P is not None else card.get("num_virtual_tokens")), _epoch(card.get("created"))


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _epoch(stamp) -> int | None:
    """'2026-12-01T10:00:00Z' (how cards and the store write times) -> Unix seconds; None otherwise."""
    try:
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except (TypeError, ValueError):
        return None
