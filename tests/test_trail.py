"""The audit trail (store/trail.py, serve/access.py): each request a server answers on a model route
is a row in the store (request id, time, API key name, task@version, artifact sha256, status,
tokens in/out), the base model's too; no prompt text; bounded; written off the request path, and a
store that cannot be written never fails a request. `softprompt store history` reads it."""

import json
import sqlite3

import pytest
import torch
from conftest import tiny_model
from starlette.testclient import TestClient
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.cli import main
from softprompt.io.artifact import save_artifact
from softprompt.serve import Engine
from softprompt.serve.access import key_id
from softprompt.serve.http import ServerConfig, create_app
from softprompt.serve.resolver import StoreResolver
from softprompt.serve.tasks import TaskRegistry
from softprompt.store import trail
from softprompt.store.core import Store

PROMPT = "bi bo ba secret words"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def add(store, model, tmp_path, name, seed):
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=3, seed=seed, projection_dim=0)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return store.add(name, save_artifact(prompt, tmp_path / f"{name}{seed}.safetensors", model))


def app_for(store, model, **config):
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    engine = Engine(model, tok, TaskRegistry(fallback=StoreResolver(store)), max_batch_size=4)
    keys = {"sk-alice": "alice", "sk-anon": None}
    names = tuple((key_id(k), n) for k, n in keys.items() if n)
    return create_app(engine, store, ServerConfig(base_model_id="base", api_keys=frozenset(keys),
                                                  api_key_names=names, **config))


def post(client, model, key="sk-alice", rid=None, **extra):
    headers = {"Authorization": f"Bearer {key}", **({"X-Request-Id": rid} if rid else {})}
    body = {"model": model, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body, headers=headers)


def test_each_served_request_is_recorded_with_its_version_and_checksum(tmp_path, llama, capsys):
    store = Store(tmp_path / "s")
    add(store, llama, tmp_path, "t", 0)
    add(store, llama, tmp_path, "t", 1)
    sha = {v: store.show(f"t@{v}")["sha256"] for v in (1, 2)}
    app = app_for(store, llama)
    with TestClient(app) as client:
        r1 = post(client, "t", rid="req-1")
        r2 = post(client, "t@1", key="sk-anon", rid="req-2")
        r3 = post(client, "base", rid="req-3")
        r4 = client.post("/v1/chat/completions", json={"model": "t", "messages": [{"role": "user", "content": PROMPT}],
                                                       "max_tokens": 2, "temperature": 0, "stream": True},
                         headers={"Authorization": "Bearer sk-alice", "X-Request-Id": "req-4"})
        r5 = post(client, "nope", rid="req-5")
        assert [r.status_code for r in (r1, r2, r3, r4, r5)] == [200, 200, 200, 200, 404]
        usage = r1.json()["usage"]
    # closing the app flushed the queue
    rows = {r["request_id"]: r for r in store.history(limit=10)}
    assert set(rows) == {"req-1", "req-2", "req-3", "req-4", "req-5"}
    got = {k: (r["task"], r["version"], r["sha256"], r["key_name"], r["status"]) for k, r in rows.items()}
    assert got == {"req-1": ("t", 2, sha[2], "alice", 200), "req-2": ("t", 1, sha[1], key_id("sk-anon"), 200),
                   "req-3": ("base", None, None, "alice", 200), "req-4": ("t", 2, sha[2], "alice", 200),
                   "req-5": ("nope", None, None, "alice", 404)}
    assert (rows["req-1"]["tokens_in"], rows["req-1"]["tokens_out"]) == (usage["prompt_tokens"],
                                                                         usage["completion_tokens"])
    assert rows["req-4"]["tokens_out"] == 2 and rows["req-4"]["route"] == "/v1/chat/completions"
    assert [r["request_id"] for r in store.history("t", limit=10)] == ["req-4", "req-2", "req-1"]
    assert [r["request_id"] for r in store.history("t@1", limit=10)] == ["req-2"]
    # no prompt text anywhere in the index (the trail stores counts, not text), nor any key
    db = sqlite3.connect(tmp_path / "s" / "index.sqlite")
    dump = "\n".join(db.iterdump())
    assert "secret words" not in dump and "sk-alice" not in dump and "sk-anon" not in dump
    assert main(["store", "history", "t", "--limit", "2", "--json", "--store", str(tmp_path / "s")]) == 0
    assert [r["request_id"] for r in json.loads(capsys.readouterr().out)] == ["req-4", "req-2"]
    assert main(["store", "history", "t", "--store", str(tmp_path / "s")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "t@2" in lines[1] and sha[2][:12] in lines[1]
    assert main(["store", "history", "", "--store", str(tmp_path / "s")]) == 2
    assert main(["store", "history", "base", "--store", str(tmp_path / "s")]) == 0
    assert "base " in capsys.readouterr().out.splitlines()[1]  # the base model's requests, under its name


def test_trail_is_bounded_and_can_be_turned_off(tmp_path, llama):
    store = Store(tmp_path / "s")
    add(store, llama, tmp_path, "t", 0)
    with TestClient(app_for(store, llama, trail_max_rows=3)) as client:
        for i in range(5):
            assert post(client, "t", rid=f"r{i}").status_code == 200
            client.app.state.trail.flush()  # one batch per request: rotation runs after each
    assert [r["request_id"] for r in store.history(limit=100)] == ["r4", "r3", "r2"]
    with TestClient(app_for(store, llama, trail=False)) as client:
        assert client.app.state.trail is None and post(client, "t", rid="off").status_code == 200
    assert "off" not in [r["request_id"] for r in store.history(limit=100)]
    with pytest.raises(ValueError, match="--limit"):
        store.history(limit=0)


def test_a_store_that_cannot_be_written_never_fails_a_request(tmp_path, llama, caplog):
    store = Store(tmp_path / "s")
    add(store, llama, tmp_path, "t", 0)
    app = app_for(store, llama)
    writer = app.state.trail

    def broken(*a, **k):
        raise sqlite3.OperationalError("disk I/O error")

    with TestClient(app) as client:
        original = trail.append
        trail.append = broken
        try:
            assert post(client, "t").status_code == 200
            writer.flush()
        finally:
            trail.append = original
    assert writer.errors == 1 and writer.written == 0
    assert "could not write 1 audit trail row" in caplog.text


def test_recording_is_off_the_request_path(tmp_path, llama):
    """record() only queues: a store whose writes take a second does not slow the answer."""
    import time

    store = Store(tmp_path / "s")
    writer = trail.TrailWriter(store, flush_s=0.05)
    original = trail.append
    trail.append = lambda *a, **k: time.sleep(1.0)
    try:
        t0 = time.perf_counter()
        for i in range(100):
            writer.record({"task": "t", "request_id": str(i)})
        assert time.perf_counter() - t0 < 0.5
    finally:
        trail.append = original
        writer.close()


def test_trail_on_postgres_appends_rotates_and_reads_back(pg, tmp_path):
    from services import new_database

    store = Store(new_database(pg.dsn), str(tmp_path / "shared"))
    assert store.history("t") == []  # no table yet: an empty trail
    trail.append(store, [{"task": "t", "version": 1, "request_id": f"r{i}", "status": 200, "tokens_in": i,
                          "tokens_out": 1, "time_ms": 1_700_000_000_000 + i} for i in range(5)], max_rows=3)
    trail.append(store, [{"task": "u", "request_id": "x", "status": 403, "time_ms": 1_700_000_000_009}], max_rows=3)
    assert [r["request_id"] for r in store.history(limit=10)] == ["x", "r4", "r3"]
    row = store.history("t", limit=1)[0]
    assert (row["version"], row["tokens_in"], row["time"]) == (1, 4, "2023-11-14T22:13:20.004Z")
