"""Prefixes on top of LoRA: a prompt trained on a LoRA-adapted model loads there, not on the bare base."""

import pytest
import torch

from conftest import ROWS, left_padded, tiny_model
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.artifact import ArtifactError, load_artifact, save_artifact
from softprompt.lora import apply_lora
from softprompt.models import BaseModelError, fingerprint
from softprompt.prefix import prefixed_forward


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
    assert torch.isfinite(out.logits).all()
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
    from softprompt.artifact import model_fingerprint

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
    monkeypatch.setattr("softprompt.models.load_base", lambda base=None, **kw: (tiny_model("llama"), tok))
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
    assert "was made for base model" in capsys.readouterr().err
    from softprompt.card import model_card

    assert "LoRA adapter" in model_card(tmp_path / "run" / "best")
