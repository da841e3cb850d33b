"""Artifacts: round trips in both forms, atomic writes, and every refusal with its message."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import ROWS, tiny_model
from safetensors.torch import save_file

from softprompt import methods
from softprompt.io.artifact import ArtifactError, load_artifact, read_card, save_artifact


def logits(prompt, model):
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        return prompt(model, ids, torch.ones_like(ids)).logits


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def prefix(llama):
    return methods.create("prefix_tuning", llama, num_virtual_tokens=4, projection_dim=8)


@pytest.mark.parametrize("form", ["dir", "file.safetensors"])
@pytest.mark.parametrize("method,opts", [("prefix_tuning", dict(projection_dim=8)), ("prompt_tuning", {}),
                                         ("p_tuning", dict(encoder="lstm", encoder_hidden_size=8))])
def test_round_trip_gives_same_logits(model, tmp_path, form, method, opts):
    prompt = methods.create(method, model, num_virtual_tokens=3, **opts)
    path = save_artifact(prompt, tmp_path / form, model, metrics={"bleu": 1.5}, dataset="toy")
    loaded = load_artifact(path, model)
    assert loaded.method == method
    assert torch.allclose(logits(loaded, model), logits(prompt, model), atol=1e-6)
    card = read_card(path)
    assert card["num_virtual_tokens"] == 3 and card["metrics"] == {"bleu": 1.5} and card["dataset"] == "toy"
    assert card["base_model"]["fingerprint"].startswith("sha256:")
    assert len(card["tensor_sha256"]) == 64 and card["library_version"] and card["created"].endswith("Z")
    assert card["bytes"] == prompt.artifact_bytes()
    assert loaded.num_trainable_parameters() == prompt.export_tensors()[next(iter(card["tensors"]))].numel()


def test_mlp_is_dropped_at_export(llama, prefix, tmp_path):
    path = save_artifact(prefix, tmp_path / "a", llama)
    card = read_card(path)
    assert list(card["tensors"]) == ["prefix"] and card["tensors"]["prefix"]["shape"] == [2, 2, 2, 4, 8]
    loaded = load_artifact(path, llama)
    assert loaded.projection_dim == 0 and torch.equal(loaded.kv(), prefix.kv().detach())


def test_overwrite_replaces_atomically_and_refuses_foreign_dirs(llama, prefix, tmp_path):
    path = save_artifact(prefix, tmp_path / "a", llama)
    other = methods.create("prefix_tuning", llama, num_virtual_tokens=6, projection_dim=0)
    save_artifact(other, path, llama)
    assert load_artifact(path, llama).num_virtual_tokens == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary leftovers
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a softprompt artifact; refusing to overwrite"):
        save_artifact(prefix, foreign, llama)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_crash_mid_write_leaves_nothing_that_loads(llama, prefix, tmp_path, monkeypatch):
    def crash(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", crash)
    for name in ["d", "f.safetensors"]:
        with pytest.raises(KeyboardInterrupt):
            save_artifact(prefix, tmp_path / name, llama)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # temporaries cleaned, target never created


def test_refuses_other_base_model(prefix, llama, tmp_path):
    path = save_artifact(prefix, tmp_path / "a", llama)
    other = tiny_model("llama", seed=1)  # same geometry, other weights
    with pytest.raises(ArtifactError, match=r"was made for base model .*fingerprint.*--base PATH"):
        load_artifact(path, other)
    assert load_artifact(path, other, allow_other_base=True).num_virtual_tokens == 4


def test_refuses_shapes_that_do_not_fit(prefix, llama, tmp_path):
    path = save_artifact(prefix, tmp_path / "a", llama)
    qwen = tiny_model("qwen2")  # 4 query heads / 2 KV heads of dim 12, not 6 / 2 of dim 8
    with pytest.raises(ArtifactError, match=r"do not fit this model.*KV heads of dim 12"):
        load_artifact(path, qwen, allow_other_base=True)


@pytest.mark.parametrize("form", ["dir", "f.safetensors"])
def test_refuses_truncated_and_altered_files(prefix, llama, tmp_path, form):
    path = save_artifact(prefix, tmp_path / form, llama)
    tensor_file = path / "adapter.safetensors" if path.is_dir() else path
    blob = tensor_file.read_bytes()
    tensor_file.write_bytes(blob[:-7])
    with pytest.raises(ArtifactError, match="truncated or altered"):
        load_artifact(path, llama)
    altered = bytearray(blob)
    altered[-3] ^= 0xFF
    tensor_file.write_bytes(bytes(altered))
    with pytest.raises(ArtifactError, match="truncated or altered"):
        load_artifact(path, llama)
    tensor_file.write_bytes(blob[:5])
    with pytest.raises(ArtifactError, match="truncated|not a softprompt artifact file"):
        load_artifact(path, llama)


def edit_card(path: Path, **changes):
    card = json.loads((path / "card.json").read_text())
    card.update(changes)
    (path / "card.json").write_text(json.dumps(card))


def test_refuses_unknown_method_and_versions(prefix, llama, tmp_path):
    path = save_artifact(prefix, tmp_path / "a", llama)
    edit_card(path, method="lora_v9")
    with pytest.raises(ArtifactError, match=r"unknown method 'lora_v9'.*upgrade softprompt"):
        load_artifact(path, llama)
    edit_card(path, method="prefix_tuning", format_version=99)
    with pytest.raises(ArtifactError, match=r"format version 99 was written by a newer softprompt.*upgrade"):
        load_artifact(path, llama)
    edit_card(path, format_version="one")
    with pytest.raises(ArtifactError, match="unknown artifact format version 'one'"):
        load_artifact(path, llama)
    edit_card(path, format_version=1, format="something-else")
    with pytest.raises(ArtifactError, match="not a softprompt artifact"):
        load_artifact(path, llama)


def test_refuses_missing_and_damaged_cards(prefix, llama, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope", llama)
    path = save_artifact(prefix, tmp_path / "a", llama)
    (path / "card.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON.*re-export"):
        load_artifact(path, llama)
    (path / "card.json").unlink()
    with pytest.raises(ArtifactError, match="has no card.json"):
        load_artifact(path, llama)
    save_artifact(prefix, tmp_path / "b", llama)
    (tmp_path / "b" / "adapter.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no adapter.safetensors"):
        load_artifact(tmp_path / "b", llama)
    plain = tmp_path / "plain.safetensors"  # a safetensors file without our card
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(ArtifactError, match="not a softprompt artifact file"):
        load_artifact(plain, llama)


def test_never_unpickles(prefix, llama, tmp_path):
    """A pickle disguised as a tensor file is rejected by the checksum and never executed."""
    import pickle

    path = save_artifact(prefix, tmp_path / "a", llama)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (path / "adapter.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ArtifactError):
        load_artifact(path, llama)
    assert not (tmp_path / "pwned").exists()
