"""`softprompt train --task classify` and `softprompt eval` of a classifier, on tiny random models:
an encoder with a head (labels given as indices in a TSV) and a decoder with label words (JSONL
with label names); refusals print one line and exit 2."""

import json

import pytest
from conftest import tiny_model
from test_classify import tiny_bert
from tiny_tokenizer import WORDS, tiny_tokenizer

from softprompt.cli import main


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    enc, dec = tmp_path_factory.mktemp("enc"), tmp_path_factory.mktemp("dec")
    tiny_bert().save_pretrained(enc)
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    tok.save_pretrained(enc)
    tiny_model("llama").save_pretrained(dec)
    tiny_tokenizer().save_pretrained(dec)
    return enc, dec


def rows(n=24):
    out = []
    for i in range(n):
        y = i % 2
        words = WORDS[10:14] if y else WORDS[50:54]
        out.append((" ".join(words[(i + j) % 4] for j in range(3 + i % 3)), y))
    return out


def test_train_and_eval_an_encoder_classifier(bases, tmp_path, capsys):
    enc, _ = bases
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows()))
    out = tmp_path / "run"
    assert main(["train", str(data), str(out), "--task", "classify", "--labels", "neg,pos", "--base", str(enc),
                 "--template", "{sentence}", "--target", "label", "--method", "prefix_tuning",
                 "--projection-dim", "0", "--num-virtual-tokens", "3", "--steps", "4", "--batch-size", "8",
                 "--eval-data", str(data), "--no-progress", "--init", "random"]) == 0
    card = json.loads((out / "best" / "card.json").read_text())
    assert card["task"] == "classify" and card["classifier"]["labels"] == ["neg", "pos"]
    assert "head.weight" in card["tensors"] and "accuracy" in card["metrics"] and "f1" in card["metrics"]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "best"), "--data", str(data), "--base", str(enc), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 24 and 0 <= res["accuracy"] <= 100 and 0 <= res["f1"] <= 100
    assert res["accuracy"] == pytest.approx(card["metrics"]["accuracy"])
    # refusals: one line, exit 2
    assert main(["train", str(data), str(tmp_path / "r2"), "--task", "classify", "--base", str(enc)]) == 2
    assert "--labels" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nba be\tmaybe\n")
    assert main(["train", str(bad), str(tmp_path / "r3"), "--task", "classify", "--labels", "neg,pos",
                 "--base", str(enc), "--steps", "1", "--no-progress"]) == 2
    assert "unknown label" in capsys.readouterr().err


def test_train_and_eval_a_decoder_with_label_words(bases, tmp_path, capsys):
    _, dec = bases
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": s, "label": ["neg", "pos"][y]}) + "\n" for s, y in rows()))
    out = tmp_path / "run"
    assert main(["train", str(data), str(out), "--task", "classify", "--labels", "neg,pos", "--label-words",
                 "ca,ce", "--base", str(dec), "--method", "prompt_tuning", "--num-virtual-tokens", "2",
                 "--steps", "3", "--batch-size", "8", "--eval-fraction", "0.25", "--no-progress"]) == 0
    card = json.loads((out / "best" / "card.json").read_text())
    assert card["classifier"]["kind"] == "verbalizer" and card["classifier"]["label_words"] == ["ca", "ce"]
    assert card["classifier"]["template"] == "{text}\nAnswer:"
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "best"), "--data", str(data), "--base", str(dec)]) == 0
    assert "accuracy" in capsys.readouterr().out
