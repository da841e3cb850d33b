"""A training run's whole configuration is one frozen RunConfig: the CLI's flags (nested and short),
`--config FILE` and the run's own run.json are its dict, and `softprompt train --config RUN/run.json`
trains the same run again."""

import json

import pytest
from tiny_tokenizer import WORDS

from softprompt import methods
from softprompt.cli import main, parse_config_command
from softprompt.runs.config import RunConfig


def test_nested_and_short_flags_are_the_same_option():
    a = parse_config_command("train", ["d", "o", "--train.steps", "7", "--prompt.num_virtual_tokens", "3",
                                       "--data.template", "{x} ||", "--model.base", "b", "--train.lr", "0.1"])
    b = parse_config_command("train", ["d", "o", "--steps", "7", "--num-virtual-tokens", "3", "--template",
                                       "{x} ||", "--base", "b", "--lr", "0.1"])
    assert a == b and a.train.steps == 7 and a.prompt == methods.PrefixTuningConfig(num_virtual_tokens=3)
    c = parse_config_command("train", ["d", "o", "--method", "prompt", "--init", "vocab", "--seed", "3"])
    assert c.method == "prompt_tuning" and c.prompt == methods.PromptTuningConfig(init="vocab", seed=3)


def test_an_option_the_method_lacks_is_one_line(capsys):
    assert main(["train", "d", "o", "--method", "prompt_tuning", "--projection-dim", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt.projection_dim" in err[0]


def test_dict_round_trip():
    cfg = RunConfig.of(train_data="d.jsonl", out="o", method="p_tuning", steps=3, encoder="lstm", report_to="tensorboard")
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="no option 'stepz'"):
        RunConfig.from_dict({"stepz": 3})


def test_a_run_reloads_from_its_own_run_json(base_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": f"{WORDS[i]} {WORDS[i + 1]}", "output": WORDS[i + 2]}) + "\n"
                            for i in range(0, 16, 2)))
    out = tmp_path / "run"
    assert main(["train", str(data), str(out), "--base", str(base_dir), "--method", "prefix_tuning",
                 "--projection-dim", "8", "--num-virtual-tokens", "2", "--train.steps", "3", "--batch-size", "4",
                 "--checkpoint-every", "0", "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["steps"] == 3 and run["prompt"]["projection_dim"] == 8 and run["train_data"] == str(data)
    first = (out / "metrics.jsonl").read_text()
    assert main(["train", "--config", str(out / "run.json"), "--overwrite"]) == 0  # the same run, again
    again = json.loads((out / "run.json").read_text())
    assert again["output"].pop("overwrite") is True and run["output"].pop("overwrite") is False and again == run
    losses = lambda text: [json.loads(x)["loss"] for x in text.splitlines()]  # noqa: E731
    assert losses((out / "metrics.jsonl").read_text()) == pytest.approx(losses(first), abs=1e-6)
