"""The store over its backends: the same semantics on SQLite + a directory (the default),
PostgreSQL + a shared directory, and PostgreSQL + S3 (moto's S3-compatible server): versions,
atomic publish, tamper detection, gc, concurrent writers, compiled forms, `store migrate`, the CLI.
Each test gets a fresh database and bucket prefix on one server per module (tests/services.py)."""

import multiprocessing as mp
import uuid

import pytest
import torch
from conftest import tiny_model
from services import S3, new_database

from softprompt import methods
from softprompt.cli import main
from softprompt.io.artifact import save_artifact
from softprompt.store import compiled
from softprompt.store.core import Store, StoreError, TaskRef

FORK = mp.get_context("fork")


@pytest.fixture(scope="module")
def s3():
    server = S3()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "pg+dir", "pg+s3"])
def spec(request, tmp_path, monkeypatch):
    """(root, objects) of an empty store of each kind; remote copies cached under tmp_path."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    if request.param == "sqlite":
        return str(tmp_path / "s"), None
    dsn = new_database(request.getfixturevalue("pg").dsn)
    if request.param == "pg+dir":
        return dsn, str(tmp_path / "shared")
    return dsn, f"{request.getfixturevalue('s3').url}/{uuid.uuid4().hex[:8]}"


def make(model, tmp_path, name="a", seed=0):
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=3, seed=seed, projection_dim=0)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return save_artifact(prompt, tmp_path / f"{name}.safetensors", model), prompt


def tensor(prompt):
    return next(iter(prompt.export_tensors().values()))


def test_same_semantics_on_every_backend(spec, llama, tmp_path):
    root, objects = spec
    store = Store(root, objects)
    paths = [make(llama, tmp_path, f"a{i}", seed=i)[0] for i in range(3)]
    token = store.version_token()
    assert [store.add("task", p, tags=["x"] if i else ()) for i, p in enumerate(paths)] == \
        [TaskRef("task", 1), TaskRef("task", 2), TaskRef("task", 3)]
    store.add("other", make(llama, tmp_path, "o", seed=7)[0], metrics={"acc": 0.5})
    assert store.version_token() == token + 4
    assert [r["name"] for r in store.ls()] == ["other", "task"] and len(store.ls(all_versions=True)) == 4
    assert [r["name"] for r in store.ls(tag="x")] == ["task"] and store.ls()[0]["metrics"] == {"acc": 0.5}
    # A second client of the same store (another server: for a remote one, an empty local cache) sees it all.
    again = Store(root)
    assert torch.equal(tensor(again.open("task@2", llama)), tensor(store.open("task@2", llama)))
    assert again.show("task")["file_ok"] and again.verify() == []
    store.rm("task@3")
    assert store.add("task", paths[2]).version == 4  # a removed number is never reused
    # Tamper: the stored bytes replaced behind the index's back are refused, never served.
    sha = store.entry("task@1").sha256
    path = store.object_path(sha)
    store._blobs.put(store._key(path), b"not the artifact")
    path.unlink(missing_ok=True) if objects and "s3://" in objects else None  # a fresh reader's view
    with pytest.raises(StoreError, match="behind the index's back"):
        Store(root).open("task@1", llama)
    assert any("task@1" in p for p in store.verify())
    store.rm("task@1")
    # gc: an orphan file (a writer killed between its upload and its row) goes; named files stay.
    orphan = store.object_path("f" * 64)
    store._blobs.put(store._key(orphan), b"x")
    assert orphan in store.gc() and store.verify() == []
    assert {p.name.removesuffix(".safetensors") for p in store._list("objects")} == \
        {r["sha256"] for r in store.ls(all_versions=True)}
    store.export("task@2", tmp_path / "out.safetensors")
    assert torch.equal(tensor(store.open("task@2", llama)), tensor(Store(root).open("task@2", llama)))


def _adder(root, path, n, out):
    store = Store(root)  # a process of its own: its own connection
    out.put([store.add("shared", path, allow_duplicate=True).version for _ in range(n)])


def test_concurrent_writers_get_distinct_dense_versions(pg, llama, tmp_path):
    dsn = new_database(pg.dsn)
    Store(dsn, str(tmp_path / "shared"))
    paths = [make(llama, tmp_path, f"w{i}", seed=i)[0] for i in range(3)]
    out = FORK.Queue()
    procs = [FORK.Process(target=_adder, args=(dsn, p, 5, out)) for p in paths]
    for p in procs:
        p.start()
    got = sorted(v for _ in procs for v in out.get(timeout=120))
    for p in procs:
        p.join(60)
    assert got == list(range(1, 16))
    rows = Store(dsn).ls(all_versions=True)
    assert [r["version"] for r in rows] == list(range(1, 16)) and Store(dsn).verify() == []


def test_compiled_forms_shared_through_s3(pg, s3, llama, tmp_path, monkeypatch):
    dsn, objects = new_database(pg.dsn), f"{s3.url}/{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "one"))
    _, prompt = make(llama, tmp_path)
    Store(dsn + "?objects=" + objects).add("a", prompt, llama)  # compiled at publish, uploaded
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "two"))  # another machine: nothing cached
    calls = []
    real = compiled.compile_entry
    monkeypatch.setattr(compiled, "compile_entry", lambda *a, **k: calls.append(1) or real(*a, **k))
    kv = Store(dsn).entry("a").kv_prefix(llama)
    assert calls == [] and torch.equal(kv, prompt.to_kv_prefix(llama))
    assert Store(dsn).verify() == []


def test_migrate_sqlite_into_postgres_and_s3(pg, s3, llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    src = Store(tmp_path / "src")
    for i in range(3):
        src.add("t", make(llama, tmp_path, f"m{i}", seed=i)[1], llama, tags=[f"v{i}"])
    src.add("u", make(llama, tmp_path, "u", seed=9)[0])
    src.rm("t@2")
    dsn, objects = new_database(pg.dsn), f"{s3.url}/{uuid.uuid4().hex[:8]}"
    assert main(["store", "migrate", str(tmp_path / "src"), dsn + "?objects=" + objects]) == 0
    assert main(["store", "migrate", str(tmp_path / "src"), dsn]) == 0  # again: all there, nothing changes
    dst = Store(dsn)
    keep = ("name", "version", "sha256", "size", "metrics", "tags", "created", "base_fingerprint")
    assert [{k: r[k] for k in keep} for r in dst.ls(all_versions=True)] == \
        [{k: r[k] for k in keep} for r in src.ls(all_versions=True)]
    assert dst.verify() == [] and dst.add("t", make(llama, tmp_path, "n")[0]).version == 4
    assert torch.equal(dst.entry("t@3").kv_prefix(llama), src.entry("t@3").kv_prefix(llama))
    capsys.readouterr()
    assert main(["store", "ls", "--all-versions", "--store", dsn]) == 0  # every store command takes a DSN
    out = capsys.readouterr().out
    assert "t@1" in out and "t@2" not in out and "t@4" in out and "u@1" in out


def test_unreachable_database_is_one_clear_error(tmp_path):
    from services import free_port

    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(StoreError, match="cannot reach the store's PostgreSQL at"):
        Store(dsn + "?objects=" + str(tmp_path))


def test_database_outage_keeps_held_tasks_serving_and_health_says_degraded(pg, tmp_path):
    """Stop PostgreSQL under a running server: tasks it holds keep serving, /health reports the store
    as degraded, a task it never resolved gets a retryable 503, and all recovers when the index returns."""
    import time

    from fastapi.testclient import TestClient
    from tiny_tokenizer import tiny_tokenizer

    from softprompt.io.load import load_base
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.main import build_app

    base = tmp_path / "tiny-base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model, _ = load_base(base)
    dsn = new_database(pg.dsn)
    store = Store(dsn, str(tmp_path / "shared"))
    for i, name in enumerate(("held", "cold")):
        store.add(name, methods.create("prefix_tuning", model, num_virtual_tokens=3, projection_dim=0, seed=i), model)
    app, _ = build_app(ServeConfig.of(store=dsn, base=str(base)))
    ask = {"prompt": "ba be bi", "max_tokens": 5, "temperature": 0}
    with TestClient(app) as client:
        want = client.post("/v1/completions", json={"model": "held", **ask}).json()["choices"][0]["text"]
        assert client.get("/health").json()["store"] == "ok"
        pg.stop("fast")
        try:
            t0 = time.monotonic()
            r = client.post("/v1/completions", json={"model": "held", **ask})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
            health = client.get("/health").json()
            assert health["status"] == "ok" and health["store"] == "degraded" and health["store_error"]
            r = client.post("/v1/completions", json={"model": "cold", **ask})
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable" and r.headers["retry-after"]
            assert time.monotonic() - t0 < 10  # nothing waits on the dead index
        finally:
            pg.start()
        deadline = time.monotonic() + 20
        while client.get("/health").json()["store"] != "ok":
            assert time.monotonic() < deadline, "the store did not recover"
            time.sleep(0.2)
        assert client.post("/v1/completions", json={"model": "cold", **ask}).status_code == 200
