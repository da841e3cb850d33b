"""A cold task loads beside the decode loop: running rows keep their tokens and their steps while
another request's task is loading (a load the test holds blocked), and the late request joins the
batch with the tokens it would have alone. Store tasks load from their compiled form."""

import threading

import pytest
import torch
from conftest import ROWS, tiny_model
from test_engine import WordTok, alone, make_tasks, text

from softprompt.core.geometry import model_fingerprint
from softprompt.io.artifact import ArtifactError, save_artifact
from softprompt.serve import Engine, PrefixCache, Request
from softprompt.serve.tasks import TaskRegistry
from softprompt.store import compiled
from softprompt.store.core import Store


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    model_fingerprint(m)
    return m


class Gated:
    """A task source (like a store entry: `open(model)` gives the prompt) whose load blocks until the
    test releases it, or fails when told to."""

    def __init__(self, prompt, error: Exception | None = None):
        self.prompt, self.error = prompt, error
        self.started, self.release = threading.Event(), threading.Event()
        self.opens = 0

    def open(self, model):
        self.opens += 1
        self.started.set()
        assert self.release.wait(30), "the test never released the load"
        if self.error is not None:
            raise self.error
        return self.prompt


def tokens(handle):
    return [e.token_id for e in handle._events]


def test_a_running_row_is_not_stalled_while_another_task_loads(model):
    tasks = make_tasks(model)
    cold = Gated(tasks["prompt_tuning-7"])
    engine = Engine(model, WordTok(), {"warm": tasks["prefix_tuning-3"], "cold": cold}, max_batch_size=4)
    run = engine.submit(Request(prompt=text(ROWS[0]), task="warm", max_new_tokens=12, ignore_eos=True))
    engine.step()  # nothing was running: its task loads on the loop, it prefills and makes a token
    assert len(tokens(run)) == 1
    late = engine.submit(Request(prompt=text(ROWS[2]), task="cold", max_new_tokens=5, ignore_eos=True))
    late2 = engine.submit(Request(prompt=text(ROWS[1]), task="cold", max_new_tokens=3, ignore_eos=True))
    engine.step()  # decodes `run` and hands the cold task to the loader thread
    assert cold.started.wait(30)
    for _ in range(5):  # the load is held: were it on the loop, step() would not return
        engine.step()
    assert not cold.release.is_set() and cold.opens == 1  # one load for both requests of the task
    assert len(tokens(run)) == 7 and tokens(late) == [] and tokens(late2) == []
    assert engine.status()["running_rows"] == 1 and engine.status()["waiting"] == 2
    cold.release.set()
    engine._loads[id(late.request)][1].result(timeout=30)
    engine.step()  # the prefix is ready: both join the running batch
    assert engine.status()["running_rows"] == 3 and len(tokens(late)) == 1 and not run.done
    while not (run.done and late.done and late2.done):
        engine.step()
    assert run.result().token_ids == alone(model, tasks["prefix_tuning-3"], ROWS[0], 12)[0]
    assert late.result().token_ids == alone(model, tasks["prompt_tuning-7"], ROWS[2], 5)[0]
    assert late2.result().token_ids == alone(model, tasks["prompt_tuning-7"], ROWS[1], 3)[0]
    assert cold.opens == 1 and engine.prefixes.stats()["misses"] == 2  # warm, cold: each loaded once


def test_a_failed_load_ends_only_its_requests(model):
    tasks = make_tasks(model)
    bad = Gated(None, error=ArtifactError("the tensor file is truncated"))
    engine = Engine(model, WordTok(), {"warm": tasks["p_tuning-5"], "bad": bad}, max_batch_size=4)
    run = engine.submit(Request(prompt=text(ROWS[0]), task="warm", max_new_tokens=6, ignore_eos=True))
    engine.step()
    doomed = engine.submit(Request(prompt=text(ROWS[1]), task="bad", max_new_tokens=3))
    unknown = engine.submit(Request(prompt=text(ROWS[1]), task="nope", max_new_tokens=3))
    engine.step()
    assert bad.started.wait(30)
    bad.release.set()
    while not (run.done and doomed.done and unknown.done):
        engine.step()
    assert doomed.result().error_code == "task_refused" and "truncated" in doomed.result().error
    assert unknown.result().error_code == "unknown_task"
    assert run.result().token_ids == alone(model, tasks["p_tuning-5"], ROWS[0], 6)[0]
    assert engine._loads == {}


def test_the_background_loop_admits_a_request_when_its_load_completes(model):
    tasks = make_tasks(model)
    cold = Gated(tasks["prefix_tuning-10"])
    engine = Engine(model, WordTok(), {"warm": tasks["prompt_tuning-7"], "cold": cold}, max_batch_size=4).start()
    try:
        run = engine.submit(Request(prompt=text(ROWS[0]), task="warm", max_new_tokens=40, ignore_eos=True))
        next(iter(run))  # running
        late = engine.submit(Request(prompt=text(ROWS[1]), task="cold", max_new_tokens=4, ignore_eos=True))
        assert cold.started.wait(30)
        n = len(tokens(run))
        while len(tokens(run)) < n + 3 and not run.done:  # the loop goes on while the load is held
            run._wait(len(tokens(run)), 1.0)
        assert not late.done and tokens(late) == []
        cold.release.set()
        assert late.result(timeout=30).token_ids == alone(model, tasks["prefix_tuning-10"], ROWS[1], 4)[0]
        assert run.result(timeout=60).token_ids == alone(model, tasks["prompt_tuning-7"], ROWS[0], 40)[0]
    finally:
        cold.release.set()
        engine.stop()


def test_store_tasks_serve_from_their_compiled_form(model, tmp_path, monkeypatch):
    tasks = make_tasks(model)
    store = Store(tmp_path / "s")
    for name in ("prompt_tuning-7", "prefix_tuning-3"):
        store.add(name, save_artifact(tasks[name], tmp_path / f"{name}.safetensors", model))
    reqs = [Request(prompt=text(r), task=n, max_new_tokens=4, ignore_eos=True)
            for n in ("prompt_tuning-7", "prefix_tuning-3") for r in ROWS[:2]]
    first = Engine(model, WordTok(), TaskRegistry(fallback=store.entry)).generate(reqs)  # compiles, stores
    compiles = []
    monkeypatch.setattr(compiled, "compile_entry", lambda *a, **k: compiles.append(1))
    again = Engine(model, WordTok(), TaskRegistry(fallback=store.entry)).generate(reqs)  # a restarted server
    assert compiles == [] and [o.token_ids for o in again] == [o.token_ids for o in first]
    for o, r in zip(first, reqs):
        assert o.token_ids == alone(model, tasks[r.task], [int(x) for x in r.prompt.split()], 4)[0]


def test_load_times_are_kept_for_a_window_only():
    cache = PrefixCache(budget_bytes=1 << 20)
    for i in range(3000):
        cache.get(f"t{i}", lambda: torch.zeros(1))
    assert len(cache.load_ms) == 1024 and cache.stats()["load_ms_p99"] is not None


def test_a_full_batch_still_starts_the_loads_of_waiting_requests(model):
    tasks = make_tasks(model)
    cold = Gated(tasks["prompt_tuning-7"])
    engine = Engine(model, WordTok(), {"warm": tasks["p_tuning-5"], "cold": cold}, max_batch_size=1)
    run = engine.submit(Request(prompt=text(ROWS[0]), task="warm", max_new_tokens=4, ignore_eos=True))
    engine.step()
    late = engine.submit(Request(prompt=text(ROWS[1]), task="cold", max_new_tokens=2, ignore_eos=True))
    engine.step()  # no free slot, but the load starts now (a prefetch), so the task is ready when one frees
    assert cold.started.wait(30) and not run.done
    cold.release.set()
    assert late.result(timeout=30).token_ids == alone(model, tasks["prompt_tuning-7"], ROWS[1], 2)[0]
    assert run.result().token_ids == alone(model, tasks["p_tuning-5"], ROWS[0], 4)[0]
