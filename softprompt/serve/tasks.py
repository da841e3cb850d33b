"""Tasks for the engine: where a task name's artifact is, and an LRU cache of compiled KV prefixes.

A task resolves to a KV prefix `(L, 2, H_kv, P, D)` once, when first used. A store task reads the
serving form the store keeps compiled for this base (softprompt/store/compiled.py: one
read of one file); an artifact path or an in-memory prompt is compiled here (prompt tuning and P-tuning by one
pass of the frozen model). The cache holds recently used prefixes under a byte budget; loading a
task never copies or reloads the model. The engine loads beside its loop (serve/loader.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from softprompt.families import family_of
from softprompt.io.artifact import ArtifactError, load_artifact
from softprompt.io.peft import PeftFormatError
from softprompt.methods import PromptMethod


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


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; retry later (nothing accepted was dropped)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


Resolver = Callable[[str], "str | os.PathLike | PromptMethod | None"]


class TaskRegistry:
    """Task name -> artifact path (or an in-memory prompt). Thread-safe.

    `fallback(name)` is asked for names not registered here (the prompt store plugs in this way),
    and returns a path, a PromptMethod, or None for unknown.
    """

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

    def remove(self, name: str) -> None:
        with self._lock:
            self._tasks.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tasks)

    def resolve(self, name: str):
        with self._lock:
            source = self._tasks.get(name)
        if source is None and self._fallback is not None:
            source = self._fallback(name)
        if source is None:
            raise UnknownTask(f"unknown task {name!r}")
        return source


class PrefixCache:
    """LRU of task name -> KV prefix on the model's device, bounded by `budget_bytes`."""

    def __init__(self, budget_bytes: int = 256 * 2**20):
        if budget_bytes <= 0:
            raise ValueError("the prefix cache budget must be positive")
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.load_ms: deque[float] = deque(maxlen=1024)  # the latest loads' times, for stats: bounded
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._items)

    def __contains__(self, name):
        return name in self._items

    def lookup(self, name: str) -> torch.Tensor | None:
        """The cached prefix (counted as a hit) or None (not counted: a `get` that loads counts the miss)."""
        with self._lock:
            kv = self._items.get(name)
            if kv is not None:
                self._items.move_to_end(name)
                self.hits += 1
            return kv

    def get(self, name: str, load: Callable[[], torch.Tensor]) -> torch.Tensor:
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

    def put(self, name: str, kv: torch.Tensor) -> None:
        size = self._nbytes(kv)
        with self._lock:
            if name in self._items:
                self.bytes -= self._nbytes(self._items.pop(name))
            while self._items and self.bytes + size > self.budget_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= self._nbytes(old)
                self.evictions += 1
            if size <= self.budget_bytes:  # a prefix larger than the budget is used but not kept
                self._items[name] = kv
                self.bytes += size

    def invalidate(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._items.clear()
                self.bytes = 0
            elif name in self._items:
                self.bytes -= self._nbytes(self._items.pop(name))

    @staticmethod
    def _nbytes(t) -> int:
        """Bytes of a KV tensor, or of the tensors of an object holding several (a Seq2SeqPrefix)."""
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        return sum(x.numel() * x.element_size() for x in vars(t).values() if isinstance(x, torch.Tensor))

    def stats(self) -> dict:
        ms = sorted(self.load_ms)
        pct = (lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 3)) if ms else (lambda q: None)
        return {"tasks": len(self._items), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "load_ms_p50": pct(0.5), "load_ms_p99": pct(0.99)}


def compile_task(name: str, source, model) -> torch.Tensor:
    """The KV prefix of a task's source, refusing what does not fit. A source is a PromptMethod, an
    artifact path, or an object with `open(model) -> PromptMethod` (a store entry, which also checks
    the file against the store's index, and whose `kv_prefix(model)` reads its compiled form)."""
    p = next(model.parameters())
    fam = family_of(model)
    try:
        if hasattr(source, "kv_prefix") and fam.flat_prefix:  # no forward pass, no module
            return source.kv_prefix(model).to(device=p.device, dtype=p.dtype)
        if isinstance(source, PromptMethod):
            prompt = source
        elif isinstance(source, (str, os.PathLike)):
            prompt = load_artifact(Path(source), model)
        else:
            prompt = source.open(model)
    except (ArtifactError, PeftFormatError) as e:
        raise TaskRefused(f"task {name!r} cannot be served: {e}") from e
    family = getattr(prompt, "family", "causal_lm")  # artifacts are checked on load; in-memory prompts here
    base_family = fam.name
    if not fam.accepts_card_family(family):
        raise TaskRefused(f"task {name!r} cannot be served: it is a prompt for a {family} model, but this server's "
                          f"base model is {base_family}")
    kv = prompt.to_kv_prefix(model)
    if not isinstance(kv, torch.Tensor):  # a Seq2SeqPrefix (encoder-decoder bases): its own .to
        with torch.no_grad():
            return kv.to(device=p.device, dtype=p.dtype)
    return kv.detach().to(device=p.device, dtype=p.dtype).contiguous()
