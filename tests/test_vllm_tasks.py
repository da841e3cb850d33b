"""The vLLM connector's view of the store (softprompt/vllm/tasks.py, no vllm needed): placeholder ids
per task version, the index read straight from SQLite, and the compiled prefix read with its
checksum checked, equal to what our engine serves."""

import pytest
import torch
from conftest import VOCAB, tiny_model

from softprompt import methods
from softprompt.core.geometry import model_fingerprint
from softprompt.io.artifact import save_artifact
from softprompt.store.core import Store
from softprompt.vllm.tasks import FIRST_ID, PrefixDamaged, TaskIndex, TaskNotFound, placeholder_ids, read_prefix


def test_placeholders_are_stable_valid_and_apart():
    a = placeholder_ids("ab" * 32, 20, 49152)
    assert a == placeholder_ids("ab" * 32, 20, 49152)  # the same on every call, process and machine
    assert a == [20559, 17701, 27109, 46307, 13082, 17121, 43154, 6903, 36122, 37651,
                 14264, 2762, 31500, 8055, 43550, 34226, 25582, 17394, 2403, 29760]  # pinned: a client and a server must agree
    assert all(FIRST_ID <= i < 49152 for i in a)
    assert placeholder_ids("ab" * 32, 5, 49152) == a[:5]
    assert placeholder_ids("cd" * 32, 20, 49152) != a  # another version: other ids, other cache blocks
    assert all(0 <= i < VOCAB for i in placeholder_ids("ab" * 32, 50, VOCAB))  # a tiny vocabulary: all of it


@pytest.fixture
def published(tmp_path):
    model = tiny_model("llama")
    store = Store(tmp_path / "s")
    prompts = {}
    for i, (method, P) in enumerate([("prefix_tuning", 3), ("prompt_tuning", 5)]):
        opts = dict(projection_dim=0) if method == "prefix_tuning" else {}
        prompt = methods.create(method, model, num_virtual_tokens=P, seed=i, **opts)
        store.add(f"t{i}", save_artifact(prompt, tmp_path / f"t{i}.safetensors", model), model)  # compiled now
        prompts[f"t{i}"] = prompt
    return model, store, prompts


def test_index_matches_placeholders_and_reads_the_served_prefix(published):
    model, store, prompts = published
    index = TaskIndex(store.root, model_fingerprint(model), "float32", VOCAB)
    assert [t.ref for t in index.tasks()] == ["t0@1", "t1@1"]
    for name, prompt in prompts.items():
        task = index.get(name)
        assert index.match(list(task.placeholders) + [7, 8]) == task
        assert index.match(list(task.placeholders)) is None  # no real token after it: not a task request
        kv = read_prefix(task)
        assert torch.equal(kv, store.entry(name).kv_prefix(model).kv())  # the bytes our engine serves
        assert kv.shape == (2, 2, 2, task.num_virtual_tokens, 8)
    assert index.match([5, 6, 7]) is None  # a bare-model request
    with pytest.raises(TaskNotFound):
        index.get("nope")
    assert TaskIndex(store.root, model_fingerprint(model), "bfloat16", VOCAB).tasks() == []  # none compiled in bf16


def test_a_new_version_is_seen_without_a_restart(published, tmp_path):
    model, store, _ = published
    index = TaskIndex(store.root, model_fingerprint(model), "float32", VOCAB, refresh_s=0.0)
    old = index.get("t0")
    other = methods.create("prefix_tuning", model, num_virtual_tokens=4, seed=9, projection_dim=0)
    store.add("t0", save_artifact(other, tmp_path / "v2.safetensors", model), model)
    new = index.get("t0")
    assert (new.version, new.num_virtual_tokens) == (2, 4) and new.placeholders != old.placeholders[:4]
    assert index.get("t0@1") == old  # the old version still served under its own placeholders


def test_an_altered_compiled_file_is_refused(published):
    model, store, _ = published
    task = TaskIndex(store.root, model_fingerprint(model), "float32", VOCAB).get("t1")
    data = bytearray(task.path.read_bytes())
    data[-1] ^= 1
    task.path.write_bytes(bytes(data))
    with pytest.raises(PrefixDamaged, match="changed behind the index"):
        read_prefix(task)
    task.path.unlink()
    with pytest.raises(PrefixDamaged, match="missing"):
        read_prefix(task)


def test_a_shared_postgresql_store_is_read_too(pg, tmp_path):
    """A shared store (PostgreSQL index, bytes in a directory every vLLM host mounts): the same tasks,
    placeholders and checked prefixes as from a directory store; a new version is seen on refresh; a
    store whose bytes are in an object store is refused with the reason."""
    from services import new_database

    model = tiny_model("llama")
    dsn = new_database(pg.dsn)
    store = Store(f"{dsn}?objects={tmp_path / 'shared'}")
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=3, seed=0, projection_dim=0)
    store.add("t0", save_artifact(prompt, tmp_path / "t0.safetensors", model), model)
    fp = model_fingerprint(model)
    index = TaskIndex(dsn, fp, "float32", VOCAB, refresh_s=3600)  # the objects directory from the store's setting
    task = index.get("t0")
    assert task.placeholders == tuple(placeholder_ids(store.show("t0")["sha256"], 3, VOCAB))
    assert index.match([*task.placeholders, 5]) == task
    assert torch.equal(read_prefix(task), prompt.to_kv_prefix(model).kv().float())
    other = methods.create("prefix_tuning", model, num_virtual_tokens=4, seed=1, projection_dim=0)
    store.add("t0", save_artifact(other, tmp_path / "v2.safetensors", model), model)
    assert index.get("t0").version == 1  # not re-read yet (refresh_s), until asked
    index.refresh()
    assert index.get("t0").version == 2
    with pytest.raises(ValueError, match="not from an object store"):
        TaskIndex(f"{dsn}?objects=s3://bucket/p", fp, "float32", VOCAB)
