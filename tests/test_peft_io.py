"""PEFT interop: an imported PEFT adapter gives PEFT's logits; PEFT loads our export and agrees."""

import json

import pytest
import torch
from conftest import ROWS
from peft import PeftModel
from test_peft_oracle import CASES, paired

from softprompt import methods
from softprompt.io.artifact import load_artifact
from softprompt.io.peft import PeftFormatError, export_peft, import_peft

TOL = 1e-4


def run(prompt, model, ids):
    with torch.no_grad():
        return prompt(model, ids, torch.ones_like(ids)).logits


@pytest.mark.parametrize("case", list(CASES))
def test_import_peft_adapter_matches_peft(model, case, tmp_path):
    ours, peft = paired(model, case)
    peft.save_pretrained(tmp_path / "adapter")
    imported = load_artifact(tmp_path / "adapter", model)  # detects the PEFT directory
    assert imported.method == CASES[case][0]
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        ref = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]
    assert (run(imported, model, ids) - ref).abs().max().item() < TOL


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_peft_loads_our_export(model, method, tmp_path):
    ours = methods.create(method, model, num_virtual_tokens=4, seed=1)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.5)
    export_peft(ours, tmp_path / "exp", model)
    peft = PeftModel.from_pretrained(model, tmp_path / "exp").eval()
    ids = torch.tensor([ROWS[2]])
    with torch.no_grad():
        ref = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]
    assert (run(ours, model, ids) - ref).abs().max().item() < TOL
    back = import_peft(tmp_path / "exp", model)  # and the round trip is exact
    assert torch.equal(next(iter(back.export_tensors().values())), next(iter(ours.export_tensors().values())))


def test_refuses_pickled_and_foreign_adapters(model, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PeftFormatError, match="never loads"):
        import_peft(d, model)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    with pytest.raises(PeftFormatError, match="'LORA' is not a prompt-learning method"):
        import_peft(d, model)


def test_refuses_adapter_for_another_geometry(tmp_path):
    from conftest import tiny_model

    llama, qwen = tiny_model("llama"), tiny_model("qwen2")
    _, peft = paired(llama, "prefix")
    peft.save_pretrained(tmp_path / "a")
    with pytest.raises(PeftFormatError, match="does not fit this model"):
        import_peft(tmp_path / "a", qwen)


def test_auto_peft_model_finds_the_base_of_a_cli_export(tmp_path, monkeypatch):
    """`softprompt export-peft` names the base where PEFT can find it: AutoPeftModel loads the
    export with no base given and gives our logits (offline: the base is a local directory)."""
    from conftest import tiny_model
    from peft import AutoPeftModelForCausalLM
    from tiny_tokenizer import tiny_tokenizer

    from softprompt.cli import main
    from softprompt.io.artifact import save_artifact
    from softprompt.io.load import load_base

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model, _ = load_base(base)
    ours = methods.create("prompt_tuning", model, num_virtual_tokens=3, seed=2, init="random")
    art = save_artifact(ours, tmp_path / "a.safetensors", model)
    monkeypatch.chdir(tmp_path)  # a relative --base still becomes a path PEFT finds from anywhere
    assert main(["export-peft", str(art), "exp", "--base", "base"]) == 0
    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    monkeypatch.chdir("/")
    peft = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    ids = torch.tensor([ROWS[1]])
    with torch.no_grad():
        ref = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]
    assert (run(ours, model, ids) - ref).abs().max().item() < TOL
    assert main(["export-peft", str(art), str(tmp_path / "exp2"), "--base", str(base),
                 "--base-model-name-or-path", "org/name"]) == 0
    assert json.loads((tmp_path / "exp2" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/name"


def test_export_of_the_embedded_model_names_its_hub_id(model, tmp_path, monkeypatch):
    from softprompt import cli
    from softprompt.io.artifact import save_artifact

    art = save_artifact(methods.create("prompt_tuning", model, num_virtual_tokens=2, seed=0), tmp_path / "a", model)
    monkeypatch.setattr(cli, "_load", lambda base, *a: (model, None))  # stands in for the embedded model
    assert cli.main(["export-peft", str(art), str(tmp_path / "exp")]) == 0
    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
