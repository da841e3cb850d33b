"""The command line as a user meets it: --version, --help without loading torch, every default
printed once, fixed sets of values listed (and agreeing with the library's own constants)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt import cli

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "softprompt.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_version():
    import softprompt

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"softprompt {softprompt.__version__}"


def test_help_loads_nothing_heavy():
    code = ("import sys; from softprompt.cli import main\n"
            "assert all(main([c, '--help']) == 0 for c in ('train', 'compare', 'serve', 'eval', 'generate'))\n"
            "assert main(['--help']) == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def _helps():
    parser = cli.build_parser()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            if isinstance(cli.COMMANDS[name], str):  # built from a config (train, compare, serve, eval, generate)
                yield name, cli.config_parser(name).format_help()
            elif name == "store":
                for sname, ssub in sub._subparsers._group_actions[0].choices.items():
                    yield f"store {sname}", ssub.format_help()
            else:
                yield name, sub.format_help()


@pytest.mark.parametrize("name,text", list(_helps()))
def test_defaults_are_printed_once_and_never_none(name, text):
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat
    for option in re.split(r"\s(?=--[a-z])", flat):  # each option's help: at most one default
        assert option.lower().count("default") <= 1 or "(default:" not in option, (name, option[:120])


def test_choices_agree_with_the_library():
    from softprompt import methods
    from softprompt.families.encoder import POOLINGS
    from softprompt.loops.train import SCHEDULES

    assert set(cli.CHOICES["method"]) == set(methods.METHODS) | set(methods.ALIASES)
    assert tuple(cli.CHOICES["schedule"]) == SCHEDULES
    assert tuple(cli.CHOICES["pooling"]) == POOLINGS
    out = run("train", "--help")
    assert "{linear,cosine,constant}" in out.stdout


def test_a_value_outside_the_choices_is_one_line_and_exit_2(tmp_path):
    out = run("train", str(tmp_path / "d.jsonl"), str(tmp_path / "o"), "--schedule", "wavy")
    assert out.returncode == 2 and "invalid choice: 'wavy'" in out.stderr


def test_config_file_sets_options_and_flags_override_it(tmp_path):
    from softprompt.cli import _with_config, build_parser, parse_config_command

    yaml_file, json_file = tmp_path / "c.yaml", tmp_path / "c.json"
    yaml_file.write_text("steps: 3\nbatch_size: 4\nschedule: constant\ngradient_checkpointing: true\n")
    json_file.write_text('{"steps": 5, "lr": 0.01}')
    for path, want in ((yaml_file, dict(steps=7, batch_size=4, schedule="constant", gradient_checkpointing=True)),
                       (json_file, dict(steps=7, lr=0.01, batch_size=8))):
        argv = ["d.jsonl", "out", "--config", str(path), "--steps", "7"]
        got = parse_config_command("train", argv).train
        assert {k: getattr(got, k) for k in want} == want  # the file's values, the command line's --steps
    nested = tmp_path / "n.yaml"  # the nested form (a run.json's), with flags of both forms
    nested.write_text("train: {steps: 3, lr: 0.5}\nprompt: {num_virtual_tokens: 4}\ndata: {template: '{mr} ||'}\n")
    cfg = parse_config_command("train", ["d", "o", "--config", str(nested), "--train.steps", "9", "--projection-dim", "0"])
    assert (cfg.train.steps, cfg.train.lr, cfg.prompt.num_virtual_tokens, cfg.prompt.projection_dim,
            cfg.data.template) == (9, 0.5, 4, 0, "{mr} ||")
    # serve, eval and generate read flat files: their flags' names (a section's field too: base, max_batch_size)
    other = tmp_path / "g.yaml"
    other.write_text("max_new_tokens: 3\nbase: b\nstop: [\"a,b\", c]\n")
    cfg = parse_config_command("generate", ["hi", "--config", str(other), "--stop", "d"])
    assert (cfg.prompt, cfg.max_new_tokens, cfg.model.base, cfg.stop) == ("hi", 3, "b", ("a,b", "c", "d"))
    other.write_text("max_batch_size: 4\nlora: l\nmerge_lora: false\nport: 0\n")
    cfg = parse_config_command("serve", ["--config", str(other), "--max-queue", "2"])
    assert (cfg.server.max_batch_size, cfg.server.max_queue, cfg.model.lora, cfg.model.merge_lora, cfg.port) == \
        (4, 2, "l", False, 0)
    other.write_text("data: d.csv\ntemplate: '{mr} ||'\nnum_beams: 2\n")
    cfg = parse_config_command("eval", ["--config", str(other)])
    assert (cfg.eval_data, cfg.rows.template, cfg.num_beams) == ("d.csv", "{mr} ||", 2)
    # the signature-built commands still read flat files through their signatures
    other.write_text("examples: 3\n")
    argv = ["inspect", "a", "--config", str(other)]
    assert vars(_with_config(argv, vars(build_parser().parse_args(argv))))["examples"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    out = run("train", "d.jsonl", str(tmp_path / "o"), "--config", str(bad))
    assert out.returncode == 2 and "no option 'stepz'" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    bad.write_text("schedule: wavy\n")
    out = run("train", "d.jsonl", str(tmp_path / "o"), "--config", str(bad))
    assert out.returncode == 2 and "invalid choice: 'wavy'" in out.stderr
