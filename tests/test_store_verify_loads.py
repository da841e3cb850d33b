"""Only artifacts that load get into the store (store/checks.py): `store add` and `store verify` check
every tensor's bytes against its header, the card's tensor list and geometry against the tensors,
and the base's geometry when the base is at hand; a damaged file is refused in one line naming the
file and the fault. Cards and card fields have size bounds (io/card_schema.py)."""

import json
import struct

import pytest
import torch
from conftest import tiny_model

from softprompt import methods
from softprompt.cli import main
from softprompt.io.artifact import META_KEY, ArtifactError, save_artifact
from softprompt.io.card_schema import MAX_CARD_BYTES
from softprompt.store import checks
from softprompt.store.core import Store, StoreError


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def good(llama, tmp_path):
    prompt = methods.create("prefix_tuning", llama, num_virtual_tokens=3, seed=0, projection_dim=0)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_(0, 1)
    return save_artifact(prompt, tmp_path / "good.safetensors", llama)


def rewrite(path, out, header=lambda h: h, card=lambda c: c):
    """A copy of artifact `path` with its safetensors header and card edited (tensor bytes kept)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    h = json.loads(blob[8:8 + n])
    c = card(json.loads(h["__metadata__"][META_KEY]))
    h["__metadata__"][META_KEY] = json.dumps(c)
    h = header(h)
    raw = json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])
    return out


def shape_plus_one(h):
    h["prefix"]["shape"][3] += 1
    return h


def refused(tmp_path, capsys, path, fault, base=None):
    argv = ["store", "add", "t", str(path), "--store", str(tmp_path / "s")] + (["--base", base] if base else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(path) in err and fault in err, err
    return err


def test_a_header_that_lies_about_its_bytes_is_refused_naming_file_and_tensor(good, tmp_path, capsys):
    bad = rewrite(good, tmp_path / "bad.safetensors", header=shape_plus_one)
    refused(tmp_path, capsys, bad, "tensor 'prefix' holds")
    err = refused(tmp_path, capsys, bad, "F32 [")
    assert "the file is damaged" in err
    assert Store(tmp_path / "s").ls() == []


def test_card_and_geometry_must_describe_the_tensors(good, tmp_path, capsys, llama):
    # the card's tensor list disagrees with the tensors
    listed = rewrite(good, tmp_path / "listed.safetensors",
                     card=lambda c: {**c, "tensors": {"prefix": {"shape": [1, 2, 3], "dtype": "float32"}}})
    refused(tmp_path, capsys, listed, "the card lists tensors")
    # P=4 on the card, tensors of P=3: not what the method needs on the recorded geometry
    p4 = rewrite(good, tmp_path / "p4.safetensors", card=lambda c: {**c, "num_virtual_tokens": 4})
    refused(tmp_path, capsys, p4, "on the base geometry its card records")
    # a geometry no model of these tensors has
    geo = rewrite(good, tmp_path / "geo.safetensors",
                  card=lambda c: {**c, "base_model": {**c["base_model"], "geometry": {
                      **c["base_model"]["geometry"], "num_layers": c["base_model"]["geometry"]["num_layers"] + 1}}})
    refused(tmp_path, capsys, geo, "on the base geometry its card records")
    # no geometry recorded: checked against the base model itself when it is given (same fingerprint)
    nogeo = rewrite(good, tmp_path / "nogeo.safetensors",
                    card=lambda c: {**c, "num_virtual_tokens": 4,
                                    "base_model": {k: v for k, v in c["base_model"].items() if k != "geometry"}})
    store = Store(tmp_path / "s2")
    with pytest.raises(StoreError, match="do not fit its base model"):
        store.add("t", nogeo, llama)
    assert store.add("t", good, llama).version == 1  # the good one loads


def test_store_verify_finds_a_damaged_file_already_in_the_store(good, tmp_path, capsys):
    import hashlib

    store = Store(tmp_path / "s")
    store.add("t", good)
    assert main(["store", "verify", "--store", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    # a file accepted before these checks existed: its sha256 is the index's, but it does not load
    bad = rewrite(good, tmp_path / "bad.safetensors", header=shape_plus_one).read_bytes()
    sha = hashlib.sha256(bad).hexdigest()
    store._put(store.object_path(sha), bad)
    with store._write() as db:
        db.execute("UPDATE tasks SET sha256 = ?, size = ?", (sha, len(bad)))
    assert store.verify() and "t@1" in store.verify()[0] and "tensor 'prefix' holds" in store.verify()[0]
    with pytest.raises(ArtifactError, match="task t@1: tensor 'prefix' holds"):
        store.approve("t@1", "alice", "")  # approving what cannot load is refused too
    assert main(["store", "verify", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "tensor 'prefix' holds" in err and sha in err


def test_header_parser_refusals():
    def blob(header: dict, data: bytes) -> bytes:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F16", "shape": [2],
                                                                          "data_offsets": [8, 12]}}
    assert checks.header_tensors(blob(ok, bytes(12)), "f") == {"a": ("F32", (2,)), "b": ("F16", (2,))}
    for header, data, fault in (
            ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "outside the data section"),
            ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "holds 8 bytes"),
            ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype"),
            ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, bytes(8), "malformed"),
            ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "a gap or an overlap"),
            ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), "cover 4 of the 8")):
        with pytest.raises(ArtifactError, match=fault):
            checks.header_tensors(blob(header, data), "f")
    with pytest.raises(ArtifactError, match="past the end"):
        checks.header_tensors(struct.pack("<Q", 999) + b"{}", "f")


def test_card_size_and_field_bounds(good, tmp_path, capsys):
    big = rewrite(good, tmp_path / "big.safetensors", card=lambda c: {**c, "notes": "x" * MAX_CARD_BYTES})
    refused(tmp_path, capsys, big, f"over the limit of {MAX_CARD_BYTES}")
    long_name = rewrite(good, tmp_path / "name.safetensors",
                        card=lambda c: {**c, "base_model": {**c["base_model"], "name": "n" * 2000}})
    refused(tmp_path, capsys, long_name, "card field 'base_model'")
    many = rewrite(good, tmp_path / "metrics.safetensors",
                   card=lambda c: {**c, "metrics": {f"m{i}": i for i in range(2000)}})
    refused(tmp_path, capsys, many, "card field 'metrics'")
    # metrics given at add time count too
    store = Store(tmp_path / "s3")
    with pytest.raises(StoreError, match="over the limit"):
        store.add("t", good, metrics={"note": "y" * MAX_CARD_BYTES})
