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
    preds = tmp_path / "preds.jsonl"
    assert main(["eval", "--adapter", str(out / "best"), "--data", str(data), "--base", str(enc), "--json",
                 "--predictions", str(preds)]) == 0
    res = json.loads(capsys.readouterr().out)
    # the predictions are the artifact's own, recomputed in this process; the metrics are theirs, by hand
    got = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [(g["text"], g["label"]) for g in got] == [(s, ["neg", "pos"][y]) for s, y in rows()]
    assert [g["prediction"] for g in got] == predicted_by_hand(out / "best", enc, [s for s, _ in rows()])
    gold, pred = [g["label"] for g in got], [g["prediction"] for g in got]
    assert res["n"] == 24
    assert res["accuracy"] == pytest.approx(100 * sum(p == g for p, g in zip(pred, gold)) / 24)
    assert res["f1"] == pytest.approx(macro_f1(pred, gold, ["neg", "pos"]))
    assert res["accuracy"] == pytest.approx(card["metrics"]["accuracy"])  # eval data = training's eval data
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
    pred = predicted_by_hand(out / "best", dec, [s for s, _ in rows()])
    gold = [["neg", "pos"][y] for _, y in rows()]
    acc = 100 * sum(p == g for p, g in zip(pred, gold)) / 24
    assert capsys.readouterr().out.startswith(f"24 rows, 2 classes (neg, pos): accuracy {acc:.2f}%  "
                                              f"macro-F1 {macro_f1(pred, gold, ['neg', 'pos']):.2f}  (")


def predicted_by_hand(artifact, base, texts):
    """Label names the artifact predicts for `texts`, by the classifier's probabilities in this process."""
    from softprompt.io.classifier import classify_texts, load_classifier
    from softprompt.runs.classify import load_classification_base

    model, tok, _ = load_classification_base(str(base))
    clf = load_classifier(artifact, model)
    return [clf.labels[i] for i in classify_texts(clf, model, tok, texts).argmax(-1).tolist()]


def macro_f1(pred, gold, labels):
    """Macro-F1 in percent over the classes that occur in gold or predictions."""
    f1s = []
    for c in labels:
        tp = sum(p == g == c for p, g in zip(pred, gold))
        fp = sum(p == c != g for p, g in zip(pred, gold))
        fn = sum(g == c != p for p, g in zip(pred, gold))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return 100 * sum(f1s) / len(f1s)
