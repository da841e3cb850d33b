"""The public API: the package root's example runs as written, and the library's defaults are the
command line's (one source: softprompt/core/defaults.py and the config dataclasses)."""

import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer

import softprompt as sp
from softprompt import cli, methods
from softprompt.core import defaults as config
from softprompt.loops.train import TrainConfig

ROWS = [{"input": f"{WORDS[i]} {WORDS[i + 1]}", "output": WORDS[i + 2]} for i in range(0, 24, 2)]


@pytest.fixture
def base(embedded_stand_in):
    return embedded_stand_in


def example_from_docstring() -> str:
    """The example in softprompt/__init__.py's docstring, as a user would paste it."""
    doc = sp.__doc__
    lines = [line[4:] for line in doc.splitlines() if line.startswith("    ")]
    return "\n".join(lines)


def test_the_package_example_runs_as_written(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = example_from_docstring()
    assert "sp.train(prompt, model, tok, rows, steps=200)" in code
    code = code.replace("steps=200", "steps=4, batch_size=4, progress=False")  # keep the test short
    code = code.replace('["name[Aromi] ||"]', f'["{WORDS[0]} {WORDS[1]}"]')
    printed = []
    scope = {"rows": ROWS, "print": printed.append}
    exec(compile(code, "softprompt/__init__.py docstring", "exec"), scope)
    assert (tmp_path / "out" / "e2e").exists()
    prompt, model = scope["prompt"], scope["model"]
    assert prompt.method == "prefix_tuning" and prompt.num_virtual_tokens == 20
    assert prompt._config["init"] == "text"  # the CLI's default start, since a tokenizer was given
    assert isinstance(printed[0], list) and len(printed[0]) == 1
    again = sp.generate(model, scope["tok"], [f"{WORDS[0]} {WORDS[1]}"], prompt)
    assert again == printed[0]  # the reloaded prompt generates what the trained one did


def test_train_takes_a_file_and_a_dataset_like_iterable(base, tmp_path):
    model, tok = sp.load_base()
    prompt = sp.create(model, sp.PromptTuningConfig(num_virtual_tokens=3), tok)
    before = prompt.prompt_embeddings.detach().clone()
    path = tmp_path / "rows.jsonl"
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    result = sp.train(prompt, model, tok, str(path), steps=2, batch_size=4, progress=False)
    assert result.step == 2 and not torch.equal(before, prompt.prompt_embeddings)

    class Dataset:  # what a datasets.Dataset offers: iteration over dict rows
        def __iter__(self):
            return iter(ROWS)

    assert sp.train(prompt, model, tok, Dataset(), steps=1, batch_size=4, progress=False).step == 1
    with pytest.raises(TypeError, match="data must be a path"):
        sp.train(prompt, model, tok, 42, steps=1)


def test_library_defaults_are_the_command_lines():
    """`softprompt train` with no options is the library's RunConfig: every TrainConfig and DataConfig
    field, and the method's config, start from the same place (the flags are built from them)."""
    from softprompt.runs.config import RunConfig

    cfg = cli.parse_config_command("train", ["d.jsonl", "out"])
    assert cfg == RunConfig.of(train_data="d.jsonl", out="out")
    assert cfg.train == TrainConfig() and cfg.prompt == methods.PrefixTuningConfig()
    assert cfg.prompt.init is None and cfg.train.lr is None  # both resolved by the method's config
    for name in methods.CONFIGS:
        assert cli.parse_config_command("train", ["d", "o", "--method", name]).prompt == methods.CONFIGS[name]()


def test_open_defaults_resolve_from_config(tokenizer=None):
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    with_tok = methods.create("prefix_tuning", model, tok, num_virtual_tokens=3)
    assert with_tok._config["init"] == "text" and with_tok._config["init_text"] == config.INIT_TEXT
    assert methods.create("prefix_tuning", model, None, num_virtual_tokens=3)._config["init"] == "random"
    assert methods.create("prompt_tuning", model, None, num_virtual_tokens=3)._config["init"] == "vocab"
    from softprompt.loops.train import Trainer

    prompt = methods.create("prompt_tuning", model, tok, num_virtual_tokens=3)
    from softprompt.loops.data import TokenizedData

    data = TokenizedData(ids=[[5, 6, 7]], n_target=[1], examples=[None])
    assert Trainer(model, tok, prompt, data, TrainConfig(steps=1)).cfg.lr == config.LR["prompt_tuning"]


def test_save_pretrained_needs_a_base_only_when_it_has_none(tmp_path):
    model = tiny_model("llama")
    prompt = methods.create("prefix_tuning", model, None, num_virtual_tokens=2, projection_dim=0)
    with pytest.raises(ValueError, match="needs the base model"):
        prompt.save_pretrained(tmp_path / "a")
    prompt.attach_base(model)
    with pytest.raises(ValueError, match="save_artifact"):  # made below the API: no artifact writer handed down
        prompt.save_pretrained(tmp_path / "a")
    from softprompt.io.artifact import save_artifact

    prompt.attach_base(model, save_artifact)
    path = prompt.save_pretrained(tmp_path / "a")
    assert torch.equal(sp.load(path, model).kv(), prompt.kv())


def test_root_exports_are_lazy_and_complete():
    import subprocess
    import sys

    code = ("import sys, softprompt; assert 'torch' not in sys.modules, 'import softprompt pulled in torch'; "
            "print(sorted(softprompt.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    for name in re.findall(r"'(\w+)'", out.stdout):
        if name != "__version__":
            assert getattr(sp, name) is not None
