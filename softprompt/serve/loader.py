"""Task prefixes loaded beside the decode loop, so a task miss never stalls the rows running.

The engine asks `TaskLoader.load(key, load)` for a waiting request's prefix and gets a future:
done at once on a prefix-cache hit, otherwise done when one background thread has run `load`
(for a store task: one read of its compiled form) and put the result in the cache.
The request stays queued meanwhile and joins the batch at the first step after the future is done;
`on_done` wakes the engine's loop. Requests for a task already loading share its future, so a
burst of requests for one cold task loads it once. A failed load is not cached: the requests that
waited on it get its error, and a later request tries again.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from softprompt.methods.base import Prefix
from softprompt.serve.tasks import PrefixCache


def done_future(value=None, error: BaseException | None = None) -> Future:
    fut: Future = Future()
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
    return fut


class TaskLoader:
    """Loads KV prefixes into `cache` on one daemon thread (started on first use); see the module doc."""

    def __init__(self, cache: PrefixCache, on_done: Callable[[], None] | None = None):
        self.cache, self.on_done = cache, on_done
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def loading(self) -> int:
        """Loads queued or running now."""
        return len(self._inflight)

    def load(self, key: str, load: Callable[[], Prefix], *, background: bool = True) -> Future:
        """A future of the prefix under `key`. A hit is done now; a miss runs `load` once per key, on the
        loader thread, or in this thread when not `background` (joining a load already under way)."""
        with self._lock:
            fut = self._inflight.get(key)
            if fut is None:
                kv = self.cache.lookup(key)
                if kv is not None:
                    return done_future(kv)
                fut = self._inflight[key] = Future()
                if background:
                    if self.on_done is not None:
                        fut.add_done_callback(lambda _: self.on_done())
                    self._queue.put((key, load, fut))
                    self._start()
                    return fut
            else:
                return fut
        self._run(key, load, fut)  # in the caller's thread
        return fut

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="softprompt-loader", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            self._run(*self._queue.get())

    def _run(self, key: str, load: Callable[[], Prefix], fut: Future) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread: the engine's no_grad does not reach here
                kv = self.cache.get(key, load)
        except BaseException as e:  # noqa: BLE001 - the error belongs to the requests waiting on it
            with self._lock:
                self._inflight.pop(key, None)
            fut.set_exception(e)
        else:
            with self._lock:
                self._inflight.pop(key, None)
            fut.set_result(kv)
