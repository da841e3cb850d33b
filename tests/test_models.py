"""Base-model plumbing: attention geometry, weight fingerprint, and loading a local model directory.

Pins: `geometry()` reads layers / query heads / KV heads / head_dim / hidden size of Llama (GQA),
GPT-2 and Qwen2 (GQA) configs, and the prefix shape uses KV heads; `fingerprint()` is
deterministic, equal for equal weights, and changes with any single weight, a permutation of
weights, the arch or the seed; `load_base(path)` returns a frozen eval-mode model and a
left-padding tokenizer with a pad token, and a bad path is a `BaseModelError` naming the path.
"""

import re

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import tiny_tokenizer

from softprompt import hf
from softprompt.core.geometry import BaseModelError, fingerprint, geometry
from softprompt.io.load import load_base

EXPECTED = {  # arch: (model_type, layers, query heads, kv heads, head_dim, hidden)
    "llama": ("llama", 2, 6, 2, 8, 48),
    "gpt2": ("gpt2", 2, 4, 4, 12, 48),
    "qwen2": ("qwen2", 2, 4, 2, 12, 48),
}


def test_geometry(arch, model):
    kind, L, H, Hkv, D, d = EXPECTED[arch]
    geo = geometry(model)
    assert (geo.model_type, geo.num_layers, geo.num_attention_heads, geo.num_key_value_heads, geo.head_dim,
            geo.hidden_size) == (kind, L, H, Hkv, D, d)
    assert geo.vocab_size == 96 and geo.max_position_embeddings == 256
    assert geo.kv_dim == Hkv * D
    assert geo.prefix_shape(5) == (L, 2, Hkv, 5, D)
    assert geometry(model.config) == geo
    assert geo.to_dict()["num_key_value_heads"] == Hkv


def test_geometry_matches_the_real_cache(model):
    """The shapes a forward pass actually caches agree with the geometry."""
    geo = geometry(model)
    with torch.no_grad():
        cache = hf.cache_of(model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True))
    assert len(hf.layers(cache)) == geo.num_layers
    for keys, values in hf.layers(cache):
        assert tuple(keys.shape) == tuple(values.shape) == (1, geo.num_key_value_heads, 3, geo.head_dim)


def test_fingerprint_is_stable(arch, model):
    fp = fingerprint(model)
    assert re.fullmatch(r"sha256:[0-9a-f]{32}", fp)
    assert fingerprint(model) == fp
    assert fingerprint(tiny_model(arch)) == fp  # a fresh model from the same seed


def test_fingerprint_sees_one_weight_change(arch, model):
    fp = fingerprint(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name, w = next((n, p) for n, p in model.named_parameters() if p.dim() == 2)
    with torch.no_grad():
        w[1, 2] += 1e-3
    assert fingerprint(model) != fp, f"+1e-3 on {name}[1, 2] went unseen"
    with torch.no_grad():
        w[1, 2] = before[name][1, 2]
    assert fingerprint(model) == fp
    for k, v in model.state_dict().items():  # fingerprinting never writes
        assert torch.equal(v, before[k])


def test_fingerprint_sees_a_permutation(model):
    """Swapping two embedding rows keeps every moment of the tensor; the fingerprint still moves."""
    fp = fingerprint(model)
    W = model.get_input_embeddings().weight
    with torch.no_grad():
        W[[5, 6]] = W[[6, 5]].clone()
    assert fingerprint(model) != fp


def test_fingerprint_differs_between_archs_and_seeds():
    prints = {fingerprint(tiny_model(a, seed=s)) for a in EXPECTED for s in (0, 1)}
    assert len(prints) == 6


# --- load_base -------------------------------------------------------------------------------

def saved_llama(path, pad=True):
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer(pad=pad).save_pretrained(path)
    return path


def test_load_base_gives_frozen_model_and_left_padding_tokenizer(tmp_path):
    path = saved_llama(tmp_path / "tiny")
    model, tok = load_base(str(path))
    assert model.training is False and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert fingerprint(model) == fingerprint(tiny_model("llama"))  # the weights that were saved
    assert geometry(model) == geometry(tiny_model("llama"))
    assert tok.padding_side == "left"
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == 0
    enc = tok(["ba be bi", "ca"], padding=True, return_tensors="pt")
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_load_base_pads_with_eos_when_the_tokenizer_has_no_pad(tmp_path):
    path = saved_llama(tmp_path / "nopad", pad=False)
    _, tok = load_base(path)
    assert tok.pad_token == tok.eos_token == "[EOS]"
    assert tok.padding_side == "left"


def test_load_base_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(BaseModelError, match=re.escape(str(missing))):
        load_base(str(missing))


def test_load_base_directory_without_a_model(tmp_path):
    """An existing directory that holds no model must also be a BaseModelError naming the path."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match=re.escape(str(tmp_path / "empty"))):
        load_base(tmp_path / "empty")


def test_load_base_tokenizer_but_no_weights(tmp_path):
    path = tmp_path / "tok-only"
    tiny_tokenizer().save_pretrained(path)
    with pytest.raises(BaseModelError, match=re.escape(str(path))):
        load_base(path)
