"""Tasks for the engine: where a task name's artifact is, and an LRU cache of compiled prefixes.

A task resolves to its `Prefix` (a decoder's: the KV prefix `(L, 2, H_kv, P, D)`) once, when first
used. A store task reads the serving form the store keeps compiled for this base
(softprompt/store/compiled.py: one read of one file); an artifact path or an in-memory prompt is
compiled here (prompt tuning and P-tuning by one pass of the frozen model). The cache holds recently used prefixes under a byte budget; loading a
task never copies or reloads the model. The engine loads beside its loop (serve/loader.py).
A resolved task also knows its card (`Task.card`, read once per content), where the routes read how
the task's inputs were formatted in training (serve/prompt_format.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompt.families import family_of, prompt_family
from softprompt.io.artifact import ArtifactError, load_artifact
from softprompt.io.peft import PeftFormatError
from softprompt.methods import PromptMethod
from softprompt.methods.base import Prefix


class RequestError(ValueError):
    """A request the engine refuses; `code` names the kind (for HTTP status mapping)."""

    code = "bad_request"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class UnknownTask(RequestError):
    code = "unknown_task"


class TaskRefused(RequestError):
    """The task exists but cannot serve on this model (other base, bad shapes, damaged file)."""

    code = "task_refused"


class TaskNotApproved(RequestError):
    """The task exists but this server serves only approved store versions (`serve --require-approved`)
    and this one is not (a draft, revoked, or its signed approval does not hold): HTTP 403."""

    code = "task_not_approved"

    def __init__(self, message: str, entry=None):
        super().__init__(message)
        self.entry = entry  # the store version refused (the audit trail records which)


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; retry later (nothing accepted was dropped)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


Resolver = Callable[[str], "str | os.PathLike | PromptMethod | None"]


class TaskRegistry:
    """Task name -> artifact path (or an in-memory prompt). Thread-safe.

    `fallback(name)` is asked for names not registered here (the prompt store plugs in this way),
    and returns a path, a PromptMethod, or None for unknown. `gate(name, source)`, when set, sees
    every resolution and returns the source to serve or raises (`serve --require-approved`:
    resolver.ApprovalGate), so no route can serve around it.
    """

    gate: Callable | None = None

    def __init__(self, tasks: Mapping[str, str | os.PathLike | PromptMethod] | None = None,
                 fallback: Resolver | None = None):
        self._tasks: dict[str, str | os.PathLike | PromptMethod] = dict(tasks or {})
        self._fallback = fallback
        self._lock = threading.Lock()

    def add(self, name: str, source: str | os.PathLike | PromptMethod) -> None:
        if not name or not isinstance(name, str):
            raise ValueError("a task needs a non-empty name")
        with self._lock:
            self._tasks[name] = source

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tasks)

    def task(self, name: str) -> "Task":
        """`name` resolved (see `resolve`), as the engine takes it."""
        return Task(name, self.resolve(name))

    def resolve(self, name: str):
        """What `name` stands for now (a path, a PromptMethod, a store entry), or UnknownTask."""
        with self._lock:
            source = self._tasks.get(name)
        if source is None and self._fallback is not None:
            source = self._fallback(name)
        if source is None:
            raise UnknownTask(f"unknown task {name!r}")
        if self.gate is not None:
            source = self.gate(name, source)
        return source


@dataclass(frozen=True)
class Task:
    """A task name resolved once (Service.task_of, or the engine for a request that came without
    one): what it stands for, and the key its compiled prefix is cached under. The key names what
    the name resolves to now, so a new version in the store is served at once."""

    name: str
    source: object

    @property
    def key(self) -> str:
        src = self.source
        return f"{self.name}:{id(src)}" if isinstance(src, torch.nn.Module) else f"{self.name}:{src}"

    @property
    def card(self) -> dict | None:
        """The task's card (what serve/prompt_format.py reads the task's input format from), or None
        where none can be read (a prompt made in memory; a damaged file, which compile_task refuses)."""
        return source_card(self.source)


class _Cards:
    """Cards read from files, by what names their content: a store entry's sha256, or a file's
    (path, size, mtime) so an artifact rewritten in place is read afresh. Bounded: LRU."""

    def __init__(self, size: int = 512):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key, read: Callable[[], dict]) -> dict:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        card = read()  # outside the lock: a slow disk does not hold up other requests' lookups
        with self._lock:
            self._items[key] = card
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return card


_CARDS = _Cards()


def source_card(source) -> dict | None:
    """The card of what a task name resolves to, checked against the card schema; None if it has
    none or it cannot be read (a request then gets today's defaults; loading the task refuses it).

    A card is read once per content (the same dict is returned to every caller: do not change it)."""
    from softprompt.io.artifact import CARD_FILE, read_card

    try:
        if hasattr(source, "sha256") and hasattr(source, "verify"):  # a store entry (store/core.py StoreEntry)
            return _CARDS.get(("sha256", source.sha256), lambda: _verified_card(source))
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            st = (path / CARD_FILE if path.is_dir() else path).stat()
            return _CARDS.get((str(path.resolve()), st.st_size, st.st_mtime_ns), lambda: read_card(path))
    except Exception:  # noqa: BLE001  missing, damaged, a remote store away: not cached, asked again next time
        return None
    card = getattr(source, "card", None)  # a prompt in memory (a loaded one keeps its card), or a loader
    return card if isinstance(card, dict) else None


def _verified_card(entry) -> dict:
    """A store entry's card, once its file is the one the index names (sha256; a remote store's file
    is fetched): a card edited behind the index's back is not believed."""
    from softprompt.io.artifact import read_card

    entry.verify()
    return read_card(entry.path)


class PrefixCache:
    """LRU of task key -> `Prefix` on the model's device, bounded by `budget_bytes`."""

    def __init__(self, budget_bytes: int = 256 * 2**20):
        if budget_bytes <= 0:
            raise ValueError("the prefix cache budget must be positive")
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, Prefix] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.load_ms: deque[float] = deque(maxlen=1024)  # the latest loads' times, for stats: bounded
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._items)

    def __contains__(self, name):
        return name in self._items

    def lookup(self, name: str) -> Prefix | None:
        """The cached prefix (counted as a hit) or None (not counted: a `get` that loads counts the miss)."""
        with self._lock:
            kv = self._items.get(name)
            if kv is not None:
                self._items.move_to_end(name)
                self.hits += 1
            return kv

    def get(self, name: str, load: Callable[[], Prefix]) -> Prefix:
        kv = self.lookup(name)
        if kv is not None:
            return kv
        with self._lock:
            self.misses += 1
        t0 = time.perf_counter()
        kv = load()
        self.load_ms.append((time.perf_counter() - t0) * 1e3)
        self.put(name, kv)
        return kv

    def put(self, name: str, kv: Prefix) -> None:
        size = kv.nbytes
        with self._lock:
            if name in self._items:
                self.bytes -= self._items.pop(name).nbytes
            while self._items and self.bytes + size > self.budget_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes
                self.evictions += 1
            if size <= self.budget_bytes:  # a prefix larger than the budget is used but not kept
                self._items[name] = kv
                self.bytes += size

    def stats(self) -> dict:
        ms = sorted(self.load_ms)
        pct = (lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 3)) if ms else (lambda q: None)
        return {"tasks": len(self._items), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "load_ms_p50": pct(0.5), "load_ms_p99": pct(0.99)}


def compile_task(task: Task, model) -> Prefix:
    """The prefix of a resolved task, on the model's device and in its dtype, refusing what does not
    fit. A source is a PromptMethod, an artifact path (`load_artifact` checks its card against the
    base), an object with `open(model) -> PromptMethod`, or a store entry: its `kv_prefix(model)`
    reads its compiled form (compiling it through `load_artifact` when there is none)."""
    p, source = next(model.parameters()), task.source
    try:
        if hasattr(source, "kv_prefix"):  # no forward pass, no module
            prefix = source.kv_prefix(model)
        else:
            if isinstance(source, PromptMethod):  # in memory: no card was checked on the way here
                fam, family = family_of(model), prompt_family(source)
                if not fam.accepts_card_family(family):
                    raise TaskRefused(f"task {task.name!r} cannot be served: it is a prompt for a {family} model, "
                                      f"but this server's base model is {fam.name}")
                prompt = source
            elif isinstance(source, (str, os.PathLike)):
                prompt = load_artifact(Path(source), model)
            else:  # an object whose `open(model)` loads the prompt (checking its card as load_artifact does)
                prompt = source.open(model)
            prefix = prompt.to_kv_prefix(model)
    except (ArtifactError, PeftFormatError) as e:
        raise TaskRefused(f"task {task.name!r} cannot be served: {e}") from e
    return prefix.to(device=p.device, dtype=p.dtype)
