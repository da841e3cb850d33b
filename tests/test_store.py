"""The prompt store: versions, atomic adds under SIGKILL, tamper detection, concurrent readers,
round trips (export/import, PEFT), the TaskRegistry hook, and the `softprompt store` commands."""

import json
import multiprocessing as mp
import os
import signal

import pytest
import torch
from conftest import tiny_model

from softprompt import methods
from softprompt.cli import main
from softprompt.io.artifact import load_artifact, read_card, save_artifact
from softprompt.store.core import Store, StoreError, TaskRef

FORK = mp.get_context("fork")  # children inherit the imported torch: no 2 s start per process


def make(model, tmp_path, name="a", seed=0, method="prefix_tuning", **opts):
    opts = opts or (dict(projection_dim=0) if method == "prefix_tuning" else {})
    prompt = methods.create(method, model, num_virtual_tokens=3, seed=seed, **opts)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return save_artifact(prompt, tmp_path / f"{name}.safetensors", model), prompt


def tensor(prompt):
    return next(iter(prompt.export_tensors().values()))


def test_versions_resolve_latest_and_are_never_reused(llama, tmp_path):
    store = Store(tmp_path / "s")
    paths = [make(llama, tmp_path, f"a{i}", seed=i)[0] for i in range(3)]
    refs = [store.add("task", p) for p in paths]
    assert refs == [TaskRef("task", 1), TaskRef("task", 2), TaskRef("task", 3)] and str(refs[1]) == "task@2"
    for i, ref in enumerate(refs):
        assert torch.equal(tensor(store.open(str(ref), llama)), tensor(load_artifact(paths[i], llama)))
    assert store.resolve("task") == store.resolve("task@3") != store.resolve("task@1")
    store.rm("task@3")
    assert store.resolve("task") == store.resolve("task@2")
    assert store.add("task", paths[0]) == TaskRef("task", 4)  # 3 named other content once: not reused
    assert store.resolve("nope") is None and store.resolve("bad name") is None and store.resolve("task@9") is None
    with pytest.raises(StoreError, match=r"task 'task' has no version 9 \(versions: 1, 2, 4\)"):
        store.open("task@9", llama)
    with pytest.raises(StoreError, match="no task 'nope'"):
        store.show("nope")
    with pytest.raises(StoreError, match="bad task name"):
        store.add("-x/y", paths[0])
    with pytest.raises(StoreError, match="bad version"):
        store.open("task@0", llama)
    assert [r.version for r in store.rm("task")] == [1, 2, 4] and store.ls() == []
    assert list((tmp_path / "s" / "objects").glob("*/*")) == []  # files go with their last row


def _writer(root, paths, stage, k, run):
    """Add new content (the metric differs) until killed: SIGKILL at the k-th add, at `stage`:
    "write" before the temp file's rename into objects/, "renamed" after it (the file is in, the row
    not yet), "commit" inside the row's transaction before COMMIT. Exact points, no timing."""
    import softprompt.core.atomic as A

    torch.set_num_threads(1)
    calls = [0]

    def hit():
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    if stage == "write":
        replace = os.replace
        os.replace = lambda *a: (hit(), replace(*a))[1]  # only _put renames during an add
    elif stage == "renamed":
        fsync_dir = A.fsync_dir  # called once the object's rename is in place (softprompt/core/atomic.py)
        A.fsync_dir = lambda p: (fsync_dir(p), hit())[0]
    else:
        class Conn:  # the store's connection, killed just before its write transaction commits
            def __init__(self, db):
                self.db = db

            def execute(self, sql, *a):
                if sql.startswith("UPDATE meta"):
                    hit()
                return self.db.execute(sql, *a)

            def __getattr__(self, name):
                return getattr(self.db, name)

        from softprompt.store.backends.sqlite import SQLiteIndex

        conn = SQLiteIndex.conn  # the index's connection, as the store's write transaction gets it
        SQLiteIndex.conn = lambda self: Conn(conn(self))
    store = Store(root)
    for i in range(10**6):
        # new bytes every add (the metric); the tensors repeat, on purpose
        store.add(f"t{i % 3}", paths[i % len(paths)], metrics={"i": i, "run": run}, allow_duplicate=True)


def test_writer_killed_mid_add_leaves_index_and_files_consistent(llama, tmp_path):
    root = tmp_path / "s"
    paths = [make(llama, tmp_path, f"a{i}", seed=i, method=m)[0]
             for i, m in enumerate(["prefix_tuning", "prompt_tuning"])]
    Store(root)
    kills = [("write", 3), ("renamed", 2), ("commit", 4), ("write", 1), ("renamed", 3), ("commit", 2)]
    for run, (stage, k) in enumerate(kills):
        proc = FORK.Process(target=_writer, args=(root, paths, stage, k, run))
        proc.start()
        proc.join(60)
        if proc.is_alive():  # it never reached its kill point: fail, without leaving it running
            proc.kill()
            proc.join()
            pytest.fail(f"the writer never reached {stage} #{k}")
        assert proc.exitcode == -signal.SIGKILL, (stage, k, proc.exitcode)
    # Each run completed the k - 1 adds before its kill, and nothing of the killed one is visible.
    assert len(Store(root).ls(all_versions=True)) == sum(k - 1 for _, k in kills) == 9
    leftovers = list((root / "tmp").iterdir())
    assert len(leftovers) == 2  # the two "write" kills left their temp files (gc removes them below)
    store = Store(root)
    rows = store.ls(all_versions=True)
    assert len(rows) == 9 and store.verify() == []  # every row's file exists and matches its sha256
    for row in rows[:: max(1, len(rows) // 10)]:
        store.open(f"{row['name']}@{row['version']}", llama)
    # Versions per name stay dense: a killed add never burned a number.
    for n in {r["name"] for r in rows}:
        vs = [r["version"] for r in rows if r["name"] == n]
        assert vs == list(range(1, len(vs) + 1))
    # A kill exactly between the file's rename and the row's commit leaves an orphan file only.
    orphan = root / "objects" / "ff" / ("f" * 64 + ".safetensors")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"x")
    (root / "tmp" / "dead.tmp").write_bytes(b"half")
    removed = store.gc()
    assert orphan in removed and root / "tmp" / "dead.tmp" in removed and set(leftovers) <= set(removed)
    assert len(removed) == 2 + 1 + 4 + 1  # temp files; the orphans of 2 "renamed" and 2 "commit" kills, and ours
    assert not orphan.exists() and store.verify() == [] and len(store.ls(all_versions=True)) == len(rows)
    assert {p.name.removesuffix(".safetensors") for p in (root / "objects").glob("*/*")} == {r["sha256"] for r in rows}


def test_crash_between_file_and_row_leaves_orphan_that_gc_removes(llama, tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    path, _ = make(llama, tmp_path)
    put = Store._put

    def put_then_die(self, obj, blob):
        put(self, obj, blob)
        raise KeyboardInterrupt  # the file is in place; the row never commits

    monkeypatch.setattr(Store, "_put", put_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.add("t", path)
    monkeypatch.undo()
    assert store.ls(all_versions=True) == [] and len(list((tmp_path / "s" / "objects").glob("*/*"))) == 1
    assert len(store.gc()) == 1 and list((tmp_path / "s" / "objects").glob("*/*")) == []
    assert store.add("t", path) == TaskRef("t", 1)


def test_file_changed_behind_index_is_refused(llama, tmp_path):
    store = Store(tmp_path / "s")
    a, _ = make(llama, tmp_path, "a", seed=1)
    b, _ = make(llama, tmp_path, "b", seed=2)
    store.add("t", a)
    obj = store.resolve("t")
    obj.write_bytes(b.read_bytes())  # a valid artifact, but not the one the index names
    with pytest.raises(StoreError, match="changed on disk behind the index's back"):
        store.open("t", llama)
    assert store.show("t")["file_ok"] is False and "changed behind the index's back" in store.verify()[0]
    with pytest.raises(StoreError, match="changed on disk behind the index's back"):
        store.export("t", tmp_path / "out.safetensors")
    obj.unlink()
    with pytest.raises(StoreError, match="is missing"):
        store.open("t", llama)
    # A tampered *source* is refused at add time too.
    blob = bytearray(a.read_bytes())
    blob[-1] ^= 1
    a.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match="truncated or altered"):
        store.add("u", a)


def _reader(root, model, stop, errors, opened, up):
    torch.set_num_threads(1)
    store = Store(root)
    up.put(store.version_token())
    n = 0
    while True:
        last = stop.is_set()
        try:
            for row in store.ls(all_versions=True):
                store.open(f"{row['name']}@{row['version']}", model)
                n += 1
            if store.resolve("w") is not None:
                store.open("w", model)
        except Exception as e:  # noqa: BLE001 (reported to the parent)
            errors.put(f"{type(e).__name__}: {e}")
            return
        if last:
            break
    opened.put(n)


def test_readers_never_see_a_half_written_task(llama, tmp_path):
    root = tmp_path / "s"
    paths = [make(llama, tmp_path, f"a{i}", seed=i)[0] for i in range(4)]
    store = Store(root)
    stop, errors, opened, up = FORK.Event(), FORK.Queue(), FORK.Queue(), FORK.Queue()
    readers = [FORK.Process(target=_reader, args=(root, llama, stop, errors, opened, up)) for _ in range(2)]
    for r in readers:
        r.start()
    token = store.version_token()
    assert [up.get(timeout=30) for _ in readers] == [token, token]  # both read before the writes start
    for i in range(30):
        store.add("w", paths[i % 4], metrics={"i": i}, tags=["even"] if i % 2 == 0 else [])
    stop.set()
    for r in readers:
        r.join(60)
    assert errors.empty(), errors.get()
    assert sum(opened.get(timeout=5) for _ in readers) >= 60  # each reader's last pass opened all 30
    assert store.version_token() == token + 30 and Store(root).version_token() == token + 30
    assert len(store.ls(tag="even", all_versions=True)) == 15


def test_ls_show_export_import_round_trips(llama, tmp_path):
    store = Store(tmp_path / "s")
    path, prompt = make(llama, tmp_path, "a", seed=5)
    gpt2 = tiny_model("gpt2")
    other, _ = make(gpt2, tmp_path, "g", seed=6)
    store.add("llama-task", path, tags=["x", "y"], metrics={"bleu": 52.0})
    store.add("gpt2-task", other, tags=["y"])
    fp = read_card(path)["base_model"]["fingerprint"]
    assert [r["name"] for r in store.ls()] == ["gpt2-task", "llama-task"]
    assert [r["name"] for r in store.ls(tag="x")] == ["llama-task"]
    assert [r["name"] for r in store.ls(base_fingerprint=fp)] == ["llama-task"]
    shown = store.show("llama-task@1")
    assert shown["file_ok"] and shown["card"]["base_model"]["fingerprint"] == fp == shown["base_fingerprint"]
    assert shown["metrics"] == {"bleu": 52.0} == shown["card"]["metrics"] and shown["tags"] == ["x", "y"]
    assert shown["method"] == "prefix_tuning" and shown["num_virtual_tokens"] == 3
    for i, dest in enumerate(["out.safetensors", "outdir"]):
        out = store.export("llama-task", tmp_path / dest)
        assert torch.equal(tensor(load_artifact(out, llama)), tensor(prompt))
        back = store.import_(out, name="back")
        assert back == TaskRef("back", i + 1) and store.show("back")["sha256"] == shown["sha256"]  # same bytes
        store.rm("back")
    with pytest.raises(StoreError, match="already exists"):
        store.export("llama-task", tmp_path / "outdir")
    assert store.import_(tmp_path / "out.safetensors").name == "out"  # name from the file
    # An in-memory prompt, and the registry hook.
    assert store.add("mem", prompt, llama) == TaskRef("mem", 1)
    assert torch.equal(tensor(store.open("mem", llama)), tensor(prompt))
    from softprompt.serve.tasks import TaskRegistry, UnknownTask

    reg = TaskRegistry(fallback=store.resolve)
    assert reg.resolve("mem") == store.resolve("mem@1")
    with pytest.raises(UnknownTask):
        reg.resolve("missing")
    entry = TaskRegistry(fallback=store.entry).resolve("mem")
    assert str(entry) == str(entry.path) == str(store.resolve("mem")) and entry.version == 1
    assert torch.equal(tensor(entry.open(llama)), tensor(prompt))
    store.resolve("mem").write_bytes(other.read_bytes())
    with pytest.raises(StoreError, match="behind the index's back"):
        entry.open(llama)
    assert store.entry("missing") is None


def test_adding_the_latest_versions_tensors_again_is_refused_unless_allowed(llama, tmp_path):
    store = Store(tmp_path / "s")
    a, prompt = make(llama, tmp_path, "a", seed=1)
    b, _ = make(llama, tmp_path, "b", seed=2)
    assert store.add("t", a) == TaskRef("t", 1)
    refused = r"^task t@1 already holds these tensors \(tensor sha256 [0-9a-f]{12}\.\.\.\); not adding them again"
    with pytest.raises(StoreError, match=refused):
        store.add("t", a, metrics={"bleu": 1.0})  # new metrics, the same tensors: no new model
    with pytest.raises(StoreError, match=refused):
        store.add("t", prompt, llama)  # the same tensors, in memory
    with pytest.raises(StoreError, match=refused):
        store.import_(a, name="t")
    assert len(store.ls(all_versions=True)) == 1  # nothing of the refused adds is there
    assert store.add("t", b) == TaskRef("t", 2)
    assert store.add("t", a) == TaskRef("t", 3)  # only the latest version counts: a's tensors after b's
    assert store.add("t", a, allow_duplicate=True) == TaskRef("t", 4)
    assert store.import_(a, name="t", allow_duplicate=True) == TaskRef("t", 5)
    assert store.add("u", a) == TaskRef("u", 1)  # another task may hold the same tensors
    # The latest file damaged behind the index's back is no duplicate: adding again repairs the task.
    store.resolve("u").write_bytes(b"damaged")
    assert store.add("u", a) == TaskRef("u", 2) and store.verify() == []


def test_import_peft_adapter(tmp_path):
    from test_peft_oracle import paired

    model = tiny_model("llama")
    ours, peft = paired(model, "prefix")
    peft.save_pretrained(tmp_path / "adapter")
    store = Store(tmp_path / "s")
    with pytest.raises(StoreError, match="needs the base model"):
        store.import_(tmp_path / "adapter")
    assert store.import_(tmp_path / "adapter", model=model) == TaskRef("adapter", 1)
    assert torch.equal(store.open("adapter", model).kv(), ours.kv().detach())
    assert store.show("adapter")["card"]["config"]["source"] == "peft"


def test_cli_store_commands(llama, tmp_path, capsys, monkeypatch):
    path, _ = make(llama, tmp_path, "a")
    s = ["--store", str(tmp_path / "s")]
    assert main(["store", "add", "demo", str(path), "--tag", "t1", "--tag", "t2", "--metric", "bleu=3.5"] + s) == 0
    assert main(["store", "add", "demo", str(path)] + s) == 2  # the same artifact again: no silent demo@2
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert out.split() == ["demo@1"] and len(err) == 1 and "--allow-duplicate" in err[0]
    assert err[0].startswith("softprompt store add: error: task demo@1 already holds these tensors")
    assert main(["store", "add", "demo", str(path), "--allow-duplicate"] + s) == 0
    assert capsys.readouterr().out.split() == ["demo@2"]
    assert main(["store", "ls", "--json", "--all-versions"] + s) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["version"], r["tags"]) for r in rows] == [("demo", 1, ["t1", "t2"]), ("demo", 2, [])]
    assert rows[0]["metrics"] == {"bleu": 3.5}
    assert main(["store", "ls"] + s) == 0 and "demo@2" in capsys.readouterr().out
    assert main(["store", "show", "demo@1"] + s) == 0 and json.loads(capsys.readouterr().out)["version"] == 1
    assert main(["store", "export", "demo@1", str(tmp_path / "e.safetensors")] + s) == 0
    assert main(["store", "import", str(tmp_path / "e.safetensors"), "--name", "copy"] + s) == 0
    assert main(["store", "rm", "demo@2"] + s) == 0 and main(["store", "gc"] + s) == 0
    assert main(["store", "verify"] + s) == 0
    out = capsys.readouterr().out
    assert "copy@1" in out and "removed demo@2" in out and out.strip().endswith("ok")
    assert main(["store", "show", "demo@2"] + s) == 2
    assert "softprompt store show: error: task 'demo' has no version 2" in capsys.readouterr().err
    assert main(["store", "add", "bad/name", str(path)] + s) == 2
    assert "bad task name" in capsys.readouterr().err
    monkeypatch.setenv("SOFTPROMPT_STORE", str(tmp_path / "env"))
    assert main(["store", "add", "e", str(path)]) == 0 and (tmp_path / "env" / "index.sqlite").exists()
