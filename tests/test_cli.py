"""The command line: info, init, generate (ours and a PEFT adapter), export-peft, one-line errors
with exit status 2 (a missing path among them, before anything loads), and generate's one default."""

import json
import subprocess
import sys

import pytest
from conftest import tiny_model
from tiny_tokenizer import tiny_tokenizer

from softprompt.cli import main
from softprompt.io.load import load_base


def test_info_json_reports_geometry_and_sizes(base_dir, capsys):
    assert main(["info", "--base", str(base_dir), "--json", "--num-virtual-tokens", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["geometry"]["num_key_value_heads"] == 2 and report["geometry"]["head_dim"] == 8
    sizes = {(r["method"], r.get("variant")): r for r in report["methods"]}
    assert sizes[("prompt_tuning", None)]["artifact_bytes"] == 4 * 48 * 4
    assert sizes[("prefix_tuning", "direct")]["artifact_bytes"] == 2 * 2 * 2 * 4 * 8 * 4
    assert report["kv_prefix_bytes_per_token"] == 2 * 2 * 16 * 4
    assert main(["info", "--base", str(base_dir)]) == 0
    assert "2 KV heads x 8" in capsys.readouterr().out


def test_init_generate_export_and_peft_round_trip(base_dir, tmp_path, capsys):
    art = tmp_path / "p.safetensors"
    assert main(["init", str(art), "--base", str(base_dir), "--method", "prefix", "--num-virtual-tokens", "3",
                 "--projection-dim", "0", "--seed", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "ba be bi", "--adapter", str(art), "--base", str(base_dir),
                 "--max-new-tokens", "5"]) == 0
    ours = capsys.readouterr().out
    assert main(["generate", "ba be bi", "--adapter", str(art), "--base", str(base_dir),
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == ours  # greedy: the same input gives the same output
    # what the engine-free library gives for the same request
    from softprompt.io.artifact import load_artifact
    from softprompt.loops.generate import generate

    model, tok = load_base(base_dir)
    kv = load_artifact(art, model).to_kv_prefix(model)
    assert ours == generate(model, tok, ["ba be bi"], kv, max_new_tokens=5)[0] + "\n"
    assert main(["export-peft", str(art), str(tmp_path / "peft"), "--base", str(base_dir)]) == 0
    assert main(["generate", "ba be bi", "--adapter", str(tmp_path / "peft"), "--base", str(base_dir),
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == ours  # a PEFT adapter directory works as --adapter


def test_errors_are_one_line_with_status_2(base_dir, tmp_path, capsys):
    assert main(["generate", "ba", "--adapter", str(tmp_path / "missing"), "--base", str(base_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("softprompt generate: error: no artifact at")
    assert main(["init", str(tmp_path / "x"), "--base", str(base_dir), "--method", "lora"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'lora'" in err and len(err.strip().splitlines()) == 1
    assert main(["info", "--base", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "ba", "--base", str(base_dir), "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err


def test_other_base_is_refused_unless_allowed(base_dir, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_model("llama", seed=9).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    art = tmp_path / "a"
    assert main(["init", str(art), "--base", str(base_dir), "--method", "prompt_tuning"]) == 0
    assert main(["generate", "ba", "--adapter", str(art), "--base", str(other)]) == 2
    assert "was made for base model" in capsys.readouterr().err
    assert main(["generate", "ba", "--adapter", str(art), "--base", str(other), "--allow-other-base",
                 "--max-new-tokens", "2"]) == 0


MISSING = [  # a command whose path does not exist: (argv, its one-line error); {t} is a fresh directory
    (["generate", "hi", "--adapter", "{t}/nothere"], "no artifact at {t}/nothere: the path does not exist"),
    (["eval", "--data", "{t}/nothere.csv"], "no data file at {t}/nothere.csv"),
    (["train", "{t}/nothere.jsonl", "{t}/run", "--overwrite"], "no data file at {t}/nothere.jsonl"),
    (["compare", "--data", "{t}/nothere.csv"], "no data file at {t}/nothere.csv"),
    (["serve", "--lora", "{t}/nolora"], "no LoRA adapter at {t}/nolora"),
    (["inspect", "{t}/nothere"], "no artifact at {t}/nothere"),
    (["card", "{t}/nothere"], "no artifact at {t}/nothere"),
    (["export-peft", "{t}/nothere", "{t}/out"], "no artifact at {t}/nothere"),
    (["store", "add", "x", "{t}/nothere", "--store", "{t}/s"], "no artifact at {t}/nothere"),
    (["info", "--base", "{t}/nobase"], "no base model directory at {t}/nobase"),
]


@pytest.mark.parametrize("argv,error", MISSING, ids=[" ".join(a[:1]) + (" " + a[1] if a[0] == "store" else "")
                                                    for a, _ in MISSING])
def test_a_missing_path_fails_before_the_command_runs(argv, error, tmp_path, capsys, monkeypatch):
    """One line, exit 2, and nothing of the command ran: no model loaded, nothing written or removed."""
    from softprompt import cli

    monkeypatch.setattr(cli, "_run", lambda *a: pytest.fail(f"{argv[0]} ran (and would load the model)"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")  # an earlier run --overwrite would remove
    assert cli.main([w.format(t=tmp_path) for w in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = " ".join(argv[:2]) if argv[0] == "store" else argv[0]
    assert len(err) == 1 and err[0].startswith(f"softprompt {name}: error: {error.format(t=tmp_path)}"), err
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "s").exists()


def test_a_missing_adapter_fails_without_importing_torch(tmp_path):
    """The check comes before anything heavy is even imported: timing-free proof that no model loaded."""
    code = ("import sys; from softprompt.cli import main\n"
            f"assert main(['generate', 'hi', '--adapter', {str(tmp_path / 'nothere')!r}]) == 2\n"
            f"assert main(['eval', '--adapter', 'none', '--data', {str(tmp_path / 'd.csv')!r}]) == 2\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("error: no ") == 2


def test_generate_has_one_default_length_for_the_cli_and_python(base_dir, monkeypatch, capsys):
    """`softprompt generate` and `sp.generate` stop after the same number of new tokens by default,
    both from GenerateConfig's field (defined once)."""
    import inspect

    import softprompt as sp
    from softprompt import families
    from softprompt.cli import parse_config_command
    from softprompt.runs import api
    from softprompt.runs.config import GenerateConfig

    assert inspect.signature(sp.generate).parameters["max_new_tokens"].default == GenerateConfig.max_new_tokens
    assert parse_config_command("generate", ["hi"]).max_new_tokens == GenerateConfig.max_new_tokens
    seen = []

    class Family:  # the real one's generate, recording what it was asked for
        def __init__(self, real):
            self.real = real

        def generate(self, model, tok, prompts, prefix, params):
            seen.append(params)
            return self.real.generate(model, tok, prompts, prefix, params)

        def __getattr__(self, name):
            return getattr(self.real, name)

    real = families.family_of
    monkeypatch.setattr(families, "family_of", lambda m: Family(real(m)))
    monkeypatch.setattr(api, "family_of", lambda m: Family(real(m)))
    assert main(["generate", "ba be", "--base", str(base_dir)]) == 0
    model, tok = load_base(base_dir)
    assert sp.generate(model, tok, ["ba be"]) == [capsys.readouterr().out[:-1]]  # the same continuation
    assert [p.max_new_tokens for p in seen] == [GenerateConfig.max_new_tokens] * 2
