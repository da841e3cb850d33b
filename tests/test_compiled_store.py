"""The store's compiled serving form: a task's KV prefix compiled once per (artifact, base), read back
with no forward pass, recompiled when the artifact or the base changes, never served when altered."""

import os

import pytest
import torch
from conftest import tiny_model

from softprompt import methods
from softprompt.cli import main
from softprompt.core.geometry import model_fingerprint
from softprompt.io.artifact import ArtifactError, save_artifact
from softprompt.methods.base import KVPrefix
from softprompt.store import compiled
from softprompt.store import core as store_mod
from softprompt.store.core import Store, StoreError


def make(model, tmp_path, name, method="prompt_tuning", seed=0, P=4):
    opts = dict(projection_dim=0) if method == "prefix_tuning" else {}
    prompt = methods.create(method, model, num_virtual_tokens=P, seed=seed, **opts)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return save_artifact(prompt, tmp_path / f"{name}.safetensors", model), prompt


def compiled_files(store):
    return sorted((store.root / "compiled").glob("*/*/*.safetensors"))


class Counting:
    """Counts compiles (forward passes / module construction) by wrapping compiled.compile_entry."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = compiled.compile_entry

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)

        monkeypatch.setattr(compiled, "compile_entry", counted)


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_compiled_on_first_serve_then_read_without_compiling(llama, tmp_path, monkeypatch, method):
    store = Store(tmp_path / "s")
    path, prompt = make(llama, tmp_path, "a", method)
    store.add("a", path)  # published without a model: nothing compiled yet
    assert compiled_files(store) == []
    compiles = Counting(monkeypatch)
    kv = store.entry("a").kv_prefix(llama)  # first serve compiles and stores
    with torch.no_grad():
        want = prompt.to_kv_prefix(llama)
    assert kv.shape == (2, 2, 2, 4, 8) and torch.equal(kv, want)
    assert compiles.n == 1 and len(compiled_files(store)) == 1
    again = Store(tmp_path / "s").entry("a").kv_prefix(llama)  # another process, say: read, not compiled
    assert compiles.n == 1 and torch.equal(again, want)


def test_add_with_the_model_compiles_at_publish_time(llama, tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    _, prompt = make(llama, tmp_path, "a")
    store.add("a", prompt, llama)  # an in-memory prompt: the model is at hand
    assert len(compiled_files(store)) == 1
    compiles = Counting(monkeypatch)
    with torch.no_grad():
        assert torch.equal(store.entry("a").kv_prefix(llama), prompt.to_kv_prefix(llama))
    assert compiles.n == 0


def test_a_new_artifact_version_gets_its_own_compiled_form(llama, tmp_path):
    store = Store(tmp_path / "s")
    p1, v1 = make(llama, tmp_path, "a1", seed=1)
    p2, v2 = make(llama, tmp_path, "a2", seed=2)
    store.add("a", p1)
    kv1 = store.entry("a").kv_prefix(llama)
    store.add("a", p2)  # new bytes, new hash: the old compiled form does not apply
    kv2 = store.entry("a").kv_prefix(llama)
    with torch.no_grad():
        assert torch.equal(kv1, v1.to_kv_prefix(llama)) and torch.equal(kv2, v2.to_kv_prefix(llama))
    assert not torch.equal(kv1, kv2) and len(compiled_files(store)) == 2
    assert torch.equal(store.entry("a@1").kv_prefix(llama), kv1)


def test_another_base_never_meets_a_prefix_compiled_for_the_first(llama, tmp_path):
    store = Store(tmp_path / "s")
    path, prompt = make(llama, tmp_path, "a")
    store.add("a", path)
    kv_a = store.entry("a").kv_prefix(llama)
    other = tiny_model("llama", seed=1)  # same geometry, other weights: another fingerprint
    with pytest.raises(ArtifactError, match="fingerprint"):  # the artifact's own check, not a stale prefix
        store.entry("a").kv_prefix(other)
    kv_b = store.entry("a").kv_prefix(other, allow_other_base=True)  # compiled afresh for this base
    with torch.no_grad():
        assert torch.equal(kv_b, prompt.to_kv_prefix(other)) and not torch.equal(kv_a, kv_b)
    assert len(compiled_files(store)) == 2
    assert torch.equal(store.entry("a").kv_prefix(llama), kv_a)


def test_an_altered_compiled_file_is_never_served(llama, tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    path, prompt = make(llama, tmp_path, "a")
    store.add("a", path)
    good = store.entry("a").kv_prefix(llama)
    (f,) = compiled_files(store)
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 0xFF  # one bit pattern in the last float
    f.write_bytes(bytes(blob))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new file version, even on coarse clocks
    assert any("changed behind the index's back" in p for p in store.verify())
    compiles = Counting(monkeypatch)
    assert torch.equal(store.entry("a").kv_prefix(llama), good)  # recompiled from the checked artifact
    assert compiles.n == 1 and store.compiled_repairs == 1 and store.verify() == []


def test_a_file_version_is_hashed_once(llama, tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    path, _ = make(llama, tmp_path, "a")
    store.add("a", path)
    store.entry("a").kv_prefix(llama)
    calls = []
    real = compiled.hashlib.sha256

    class Spy:
        @staticmethod
        def sha256(*a):
            calls.append(1)
            return real(*a)

    monkeypatch.setattr(compiled, "hashlib", Spy)
    artifact_hashes = []
    real_sha = store_mod._sha
    monkeypatch.setattr(store_mod, "_sha", lambda data: artifact_hashes.append(1) or real_sha(data))
    compiled._verified.clear()  # as in a fresh process
    for _ in range(3):
        store.entry("a").kv_prefix(llama)
    # the compiled file and the artifact are each hashed on the first read in this process; then the
    # same (inode, size, mtime) is trusted
    assert len(calls) == 1 and len(artifact_hashes) == 1
    obj = store.entry("a").path
    blob = bytearray(obj.read_bytes())
    blob[-1] ^= 0xFF
    obj.write_bytes(bytes(blob))  # the published artifact, altered behind the index's back
    os.utime(obj, ns=(0, obj.stat().st_mtime_ns + 10**9))
    with pytest.raises(StoreError, match="changed on disk behind the index"):  # refused, compiled form or not
        store.entry("a").kv_prefix(llama)


def test_a_read_only_store_still_serves(llama, tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    path, prompt = make(llama, tmp_path, "a")
    store.add("a", path)

    def refuse(*a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(compiled, "publish", refuse)
    with torch.no_grad():
        assert torch.equal(store.entry("a").kv_prefix(llama), prompt.to_kv_prefix(llama))
    assert store.compiled_write_errors == 1 and compiled_files(store) == []


def test_rm_and_gc_remove_compiled_forms(llama, tmp_path):
    store = Store(tmp_path / "s")
    store.add("a", make(llama, tmp_path, "a", seed=1)[0])
    store.add("b", make(llama, tmp_path, "b", seed=2)[0])
    for name in "ab":
        store.entry(name).kv_prefix(llama)
    assert len(compiled_files(store)) == 2
    store.rm("a")
    assert len(compiled_files(store)) == 1
    orphan = compiled_files(store)[0].with_name("0" * 64 + ".float32.safetensors")  # killed before its row
    orphan.write_bytes(b"x" * 16)
    store.gc()
    assert compiled_files(store) == [compiled.compiled_path(store, store.entry("b").sha256,
                                                            model_fingerprint(llama), torch.float32)]


def test_store_compile_command(llama, tmp_path, monkeypatch, capsys):
    store = Store(tmp_path / "s")
    store.add("a", make(llama, tmp_path, "a")[0])
    monkeypatch.setattr("softprompt.cli._load", lambda base, *a, **k: (llama, None))
    main(["store", "compile", "--store", str(tmp_path / "s")])
    assert "a@1" in capsys.readouterr().out and len(compiled_files(store)) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_read_prefix_is_its_own_tensor_in_every_serving_dtype(tmp_path, dtype):
    """The read fills a tensor of the prefix's own shape: nothing else (no file-sized buffer under a
    view) stays alive with it in the prefix cache, and the bytes are exactly those written."""
    store = Store(tmp_path / "s")
    kv = torch.randn(2, 2, 3, 5, 4).to(dtype)
    path = compiled.publish(store, "ab" * 32, "sha256:" + "cd" * 32, KVPrefix(kv))
    want = compiled._row(store, "ab" * 32, "sha256:" + "cd" * 32, dtype)
    compiled._verified.clear()
    for _ in range(2):  # hashed, then trusted
        got = compiled.read_kv(path, want)
        assert got._base is None and got.dtype == dtype and torch.equal(got, kv)
    with pytest.raises(compiled.CompiledDamaged, match="changed behind"):
        compiled._verified.clear()
        compiled.read_kv(path, "0" * 64)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(compiled.CompiledDamaged, match="offsets do not fit|truncated"):
        compiled.read_kv(path, want)
