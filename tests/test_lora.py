"""Prefixes on top of LoRA: a prompt trained on a LoRA-adapted model loads there, not on the bare base."""

import pytest
import torch
from conftest import ROWS, left_padded, tiny_model
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.core.geometry import BaseModelError, fingerprint
from softprompt.hf.prefix import prefixed_forward
from softprompt.io.artifact import ArtifactError, load_artifact, save_artifact
from softprompt.io.lora import apply_lora


def make_lora(tmp_path, seed: int = 0):
    """A PEFT LoRA adapter (r=2) for the tiny llama with random B weights, so it changes the model."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = tmp_path / "lora"
    pm.save_pretrained(out)
    assert (out / "adapter_model.safetensors").is_file()
    return out


def merged_by_hand(lora_dir):
    """The tiny llama with the adapter's deltas added to its weights, read from the files alone (not PEFT)."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    w = load_file(lora_dir / "adapter_model.safetensors")
    model = tiny_model("llama")
    params = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for k, a in w.items():
            if ".lora_A." in k:
                b = w[k.replace(".lora_A.", ".lora_B.")]
                name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                params[name] += scale * b @ a
                n += 1
    assert n == 4  # q_proj and v_proj in 2 layers
    return model


@pytest.mark.parametrize("merge", [True, False])
def test_prefix_on_lora_loads_there_and_is_refused_on_bare_base(tmp_path, merge):
    lora = make_lora(tmp_path)
    bare = tiny_model("llama")
    adapted = apply_lora(tiny_model("llama"), lora, merge=merge)
    assert fingerprint(adapted) != fingerprint(bare)
    if not merge:
        assert any("lora_A" in k for k in adapted.state_dict())  # the fingerprint covers the LoRA weights
    ids, mask = left_padded(ROWS)
    assert not torch.allclose(adapted(input_ids=ids, attention_mask=mask).logits,
                              bare(input_ids=ids, attention_mask=mask).logits)
    prompt = methods.create("prefix_tuning", adapted, num_virtual_tokens=3, projection_dim=0, seed=1)
    art = save_artifact(prompt, tmp_path / "pre", adapted)
    assert "+lora:" in load_artifact(art, adapted).card["base_model"]["name"]
    loaded = load_artifact(art, adapted)
    assert torch.equal(loaded.to_kv_prefix(adapted), prompt.to_kv_prefix(adapted))
    out = prefixed_forward(adapted, ids, mask, [loaded.to_kv_prefix(adapted)], use_cache=False)
    # The prefix on the adapted model equals the prefix on a base whose weights are merged by hand from
    # the adapter file (W + alpha/r * B @ A): the LoRA deltas are applied at their scale, and the prefix counts.
    ref = merged_by_hand(lora)
    kv = loaded.to_kv_prefix(adapted)
    torch.testing.assert_close(out.logits, prefixed_forward(ref, ids, mask, [kv], use_cache=False).logits,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.logits, prefixed_forward(ref, ids, mask, [None], use_cache=False).logits,
                              atol=1e-3)
    with pytest.raises(ArtifactError, match="was made for base model .*fingerprint"):
        load_artifact(art, bare)


def test_merged_and_unmerged_give_the_same_logits(tmp_path):
    lora = make_lora(tmp_path)
    merged = apply_lora(tiny_model("llama"), lora, merge=True)
    unmerged = apply_lora(tiny_model("llama"), lora, merge=False)
    ids, mask = left_padded(ROWS)
    a = merged(input_ids=ids, attention_mask=mask).logits
    b = unmerged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fingerprint_cache_is_dropped_when_lora_changes_the_weights(tmp_path):
    from softprompt.core.geometry import model_fingerprint

    lora = make_lora(tmp_path)
    model = tiny_model("llama")
    before = model_fingerprint(model)
    adapted = apply_lora(model, lora, merge=True)
    assert model_fingerprint(adapted) != before == fingerprint(tiny_model("llama"))


def test_pickled_or_wrong_adapters_are_refused(tmp_path):
    lora = make_lora(tmp_path)
    (lora / "adapter_model.safetensors").rename(lora / "adapter_model.bin")
    with pytest.raises(BaseModelError, match="pickled adapter_model.bin"):
        apply_lora(tiny_model("llama"), lora)
    with pytest.raises(BaseModelError, match="not a PEFT adapter directory"):
        apply_lora(tiny_model("llama"), tmp_path / "nope")


def test_cli_train_and_generate_with_lora(tmp_path, monkeypatch, capsys):
    import json

    from softprompt import cli

    lora = make_lora(tmp_path)
    tok = tiny_tokenizer()
    monkeypatch.setattr("softprompt.io.load.load_base", lambda base=None, **kw: (tiny_model("llama"), tok))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": "ba be", "output": "bo"}) + "\n" for _ in range(4)))
    assert cli.main(["train", str(data), str(tmp_path / "run"), "--method", "prompt_tuning", "--lora", str(lora),
                     "--num-virtual-tokens", "2", "--steps", "2", "--batch-size", "2", "--checkpoint-every", "0",
                     "--no-progress"]) == 0
    card = json.loads((tmp_path / "run" / "best" / "card.json").read_text())
    assert "+lora:" in card["base_model"]["name"]
    assert cli.main(["generate", "ba be", "--adapter", str(tmp_path / "run" / "best"), "--lora", str(lora),
                     "--max-new-tokens", "2"]) == 0
    assert cli.main(["generate", "ba be", "--adapter", str(tmp_path / "run" / "best"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "was made for base model" in err and f"pass --lora {lora}" in err
    from softprompt.io.card import model_card

    assert "LoRA adapter" in model_card(tmp_path / "run" / "best")


def _prompt_on(model, seed: int):
    """A small prefix with visible effect (entries N(0, 0.5)), so outputs depend on it."""
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=3, projection_dim=0, seed=seed)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_(0, 0.5)
    return prompt


def test_eval_with_lora_scores_the_adapted_model_and_refuses_the_wrong_base(tmp_path, monkeypatch, capsys):
    import json

    from softprompt import cli
    from softprompt.loops.evaluate import predict

    lora = make_lora(tmp_path)
    tok = tiny_tokenizer()
    monkeypatch.setattr("softprompt.io.load.load_base", lambda base=None, **kw: (tiny_model("llama"), tok))
    adapted = apply_lora(tiny_model("llama"), lora)
    on_lora = save_artifact(_prompt_on(adapted, 1), tmp_path / "on_lora", adapted)
    on_bare = save_artifact(_prompt_on(tiny_model("llama"), 2), tmp_path / "on_bare", tiny_model("llama"))
    data = tmp_path / "d.jsonl"
    rows = [("ba be", "bo bu"), ("ca ce", "ci co"), ("ba be", "da de")]  # 2 inputs, the first with 2 references
    data.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in rows))
    preds = tmp_path / "p.jsonl"
    ev = ["eval", "--data", str(data), "--max-new-tokens", "3", "--json"]
    assert cli.main(ev + ["--adapter", str(on_lora), "--lora", str(lora), "--predictions", str(preds)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 2 and res["references"] == 3
    got = [json.loads(line) for line in preds.read_text().splitlines()]
    # the outputs are the adapted model's under the prefix, not the bare model's
    kv = load_artifact(on_lora, adapted).to_kv_prefix(adapted)
    assert [g["output"] for g in got] == predict(adapted, tok, ["ba be", "ca ce"], kv, max_new_tokens=3)
    assert got[0]["references"] == ["bo bu", "da de"]
    # refused both ways, each time naming the flag that fits
    assert cli.main(ev + ["--adapter", str(on_bare), "--lora", str(lora)]) == 2
    err = capsys.readouterr().err
    assert "was made for base model" in err and "trained on the bare base model" in err and "drop --lora" in err
    assert cli.main(ev + ["--adapter", str(on_lora)]) == 2
    assert f"pass --lora {lora}" in capsys.readouterr().err
    assert cli.main(ev + ["--adapter", str(on_lora), "--lora", str(lora), "--no-merge-lora"]) == 2
    assert "drop --no-merge-lora" in capsys.readouterr().err  # merged and unmerged are different fingerprints
    assert cli.main(ev + ["--adapter", str(on_bare)]) == 0  # the bare base still takes its own prompt


@pytest.mark.parametrize("merge", [True, False])
def test_serve_with_lora_serves_prompts_trained_on_it_and_refuses_bare_base_ones(tmp_path, merge):
    from fastapi.testclient import TestClient

    from softprompt.io.load import load_base
    from softprompt.serve import Engine, Request
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.main import build_app
    from softprompt.store.core import Store

    lora = make_lora(tmp_path)
    base_dir = tmp_path / "tiny-base"
    tiny_model("llama").save_pretrained(base_dir)
    tok = tiny_tokenizer()
    tok.save_pretrained(base_dir)
    bare, _ = load_base(base_dir)
    adapted = apply_lora(load_base(base_dir)[0], lora, merge=merge)
    store = Store(tmp_path / "store")
    on_lora = _prompt_on(adapted, 1)
    store.add("on-lora", save_artifact(on_lora, tmp_path / "a.safetensors", adapted))
    store.add("on-bare", save_artifact(_prompt_on(bare, 2), tmp_path / "b.safetensors", bare))
    app, config = build_app(ServeConfig.of(store=str(tmp_path / "store"), base=str(base_dir), lora=str(lora),
                                            merge_lora=merge))
    assert config.base_model_id == "tiny-base+lora:lora"
    assert app.state.engine.model is not bare and fingerprint(app.state.engine.model) == fingerprint(adapted)
    ask = dict(prompt="ba be bi", max_tokens=5, temperature=0)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "on-lora", **ask})
        assert r.status_code == 200, r.text
        want = Engine(adapted, tok, {"t": on_lora}).generate(
            [Request(task="t", prompt="ba be bi", max_new_tokens=5)])[0].text
        assert r.json()["choices"][0]["text"] == want
        r = client.post("/v1/completions", json={"model": "on-bare", **ask})
        assert r.status_code == 400 and "was made for base model" in r.json()["error"]["message"]
        # the base model served is the adapted one (the bare base answers differently)
        base_text = client.post("/v1/completions", json={"model": "tiny-base+lora:lora", **ask}).json()
        alone = [Engine(m, tok, {}).generate([Request(task=None, prompt="ba be bi", max_new_tokens=5)])[0].text
                 for m in (adapted, bare)]
        assert base_text["choices"][0]["text"] == alone[0] != alone[1]
