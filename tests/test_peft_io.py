"""PEFT interop: an imported PEFT adapter gives PEFT's logits; PEFT loads our export and agrees."""

import json

import pytest
import torch
from conftest import ROWS
from peft import PeftModel, get_peft_model
from test_peft_oracle import CASES, paired

from softprompt import methods
from softprompt.artifact import load_artifact
from softprompt.peft_io import PeftFormatError, export_peft, import_peft

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
