"""Devices and precisions: one resolver refuses what cannot run; a base in bfloat16 serves mixed
batches whose rows equal each row alone (within bfloat16), with prefixes cast at serving time and
float32 in artifacts; the base's fingerprint is the float32 weights' whatever the precision; every
command that loads a model takes --device/--dtype/--quantize/--threads."""

import json

import pytest
import torch
from conftest import ROWS, tiny_model
from test_engine import WordTok, make_tasks, text

from softprompt import methods
from softprompt.core import device as devmod
from softprompt.core.device import DeviceError, resolve, set_threads
from softprompt.core.geometry import model_fingerprint
from softprompt.hf.prefix import check_prefix_support, prefixed_forward
from softprompt.io.artifact import load_artifact, save_artifact
from softprompt.io.load import place
from softprompt.loops.generate import SamplingParams, generate_ids
from softprompt.serve import Engine, Request


def test_resolver_names_and_refusals():
    p = resolve("auto", "bf16", "none")
    assert p.device == torch.device("cuda" if torch.cuda.is_available() else "cpu") and p.dtype == torch.bfloat16
    assert resolve("cpu", torch.float16).dtype == torch.float16 and resolve("cpu", "float32", "int8").quantize == "int8"
    for bad, what in [(dict(device="tpu"), "device"), (dict(dtype="int4"), "dtype"), (dict(quantize="int3"), "quantization"),
                      (dict(quantize="int8", dtype="bfloat16"), "float32")]:
        with pytest.raises(DeviceError, match=what):
            resolve(**{"device": "cpu", **bad})
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            resolve("cuda:0")
    from softprompt.hf.quantize import supported

    with pytest.raises(DeviceError, match="CPU only"):
        supported("cuda")


def test_defaults_are_validated_and_explicit_arguments_win():
    saved = devmod.defaults()
    try:
        devmod.set_defaults(dtype="bfloat16")
        assert resolve().dtype == torch.bfloat16 and resolve(dtype="float32").dtype == torch.float32
        with pytest.raises(DeviceError):
            devmod.set_defaults(device="nowhere")
        assert devmod.defaults()["device"] == saved["device"]  # a refused flag changes nothing
    finally:
        devmod.set_defaults(**saved)


def test_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(1) == 1
        monkeypatch.setattr(devmod.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
        assert devmod.default_threads() == 1  # a busy machine: one thread, not one per core
        monkeypatch.setattr(devmod.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert devmod.default_threads() >= 1
        with pytest.raises(DeviceError):
            set_threads(-1)
    finally:
        torch.set_num_threads(before)


def bf16(arch="llama"):
    model = tiny_model(arch)
    fp = model_fingerprint(model)
    return place(model, resolve("cpu", "bfloat16")), fp


def test_placed_model_keeps_the_float32_fingerprint_and_artifacts_stay_float32(tmp_path):
    fp32 = tiny_model("llama")
    model, fp = bf16("llama")
    assert next(model.parameters()).dtype == torch.bfloat16 and model_fingerprint(model) == fp
    # a prompt made on the float32 base loads on the bfloat16 one, and one made on bfloat16 saves float32
    path = save_artifact(methods.create("prefix_tuning", fp32, num_virtual_tokens=4, projection_dim=0), tmp_path / "a", fp32)
    kv = load_artifact(path, model).to_kv_prefix(model)
    assert kv.dtype == torch.bfloat16
    made = methods.create("prefix_tuning", model, num_virtual_tokens=4, projection_dim=8)
    assert all(p.dtype == torch.float32 for p in made.parameters())
    card = json.loads((save_artifact(made, tmp_path / "b", model) / "card.json").read_text())
    assert card["base_model"]["fingerprint"] == fp and {t["dtype"] for t in card["tensors"].values()} == {"float32"}


def test_float32_prefix_is_cast_where_it_enters_and_gradients_reach_it():
    model, _ = bf16("qwen2")
    check_prefix_support(model)  # bfloat16's own tolerance
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=3, projection_dim=0)
    kv = prompt.kv()  # float32, trainable
    ids = torch.tensor([ROWS[0]])
    out = prefixed_forward(model, ids, torch.ones_like(ids), [kv], use_cache=False)
    assert out.logits.dtype == torch.bfloat16
    out.logits.float().sum().backward()
    assert prompt.prefix.grad is not None and prompt.prefix.grad.dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bfloat16_mixed_batch_rows_equal_rows_alone(arch):
    model, _ = bf16(arch)
    tasks = make_tasks(model)
    names = [None, *tasks]
    engine = Engine(model, WordTok(), tasks, max_batch_size=4, keep_logits=True)
    reqs = [Request(prompt=text(ROWS[j % 3] + [10 + j]), task=names[j % len(names)], max_new_tokens=4,
                    ignore_eos=True) for j in range(7)]
    for req, out in zip(reqs, engine.generate(reqs)):
        prompt = tasks.get(req.task)
        kv = None if prompt is None else prompt.to_kv_prefix(model)
        assert kv is None or kv.dtype == torch.bfloat16
        ids = torch.tensor([[int(x) for x in req.prompt.split()]])
        toks = generate_ids(model, ids, torch.ones_like(ids), [kv], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
        assert out.token_ids == toks
        first = prefixed_forward(model, ids, torch.ones_like(ids), [kv], use_cache=False).logits[0, -1].float()
        # bfloat16 keeps 8 bits of mantissa: a row in a batch may round differently from the row alone
        assert (out.logits[0].float() - first).abs().max().item() <= 0.02 * max(1.0, first.abs().max().item())


def test_every_model_command_takes_the_device_flags(capsys):
    from softprompt.cli import LOADS_MODEL, build_parser, main

    from softprompt.cli import parse_config_command

    parser = build_parser()
    for name in sorted(LOADS_MODEL):
        words = name.split()
        if name in ("train", "compare", "serve", "eval", "generate"):  # a config's model part (a ModelConfig)
            cfg = parse_config_command(name, _positionals(name) + ["--device", "cpu", "--dtype", "bfloat16",
                                                                   "--quantize", "none", "--threads", "1"])
            m = (cfg.run if name == "compare" else cfg).model
            assert (m.device, m.dtype, m.quantize, m.threads) == ("cpu", "bfloat16", "none", 1), name
            continue
        args = vars(parser.parse_args([*words, *["x"] * 3][:len(words)] + _positionals(name) +
                                      ["--device", "cpu", "--dtype", "bfloat16", "--quantize", "none", "--threads", "1"]))
        assert (args["device"], args["dtype"], args["quantize"], args["threads"]) == ("cpu", "bfloat16", "none", 1), name
    assert main(["generate", "hi", "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def _positionals(name: str) -> list[str]:
    return {"init": ["out"], "generate": ["hi"], "export-peft": ["a", "b"], "train": ["d", "o"], "inspect": ["a"],
            "store add": ["n", "a"], "store import": ["s"], "audit": ["a"]}.get(name, [])
