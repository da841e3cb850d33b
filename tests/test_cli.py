"""The command line: info, init, generate (ours and a PEFT adapter), export-peft, and one-line
errors with exit status 2."""

import json

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
