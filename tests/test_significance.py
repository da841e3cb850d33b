"""Intervals and significance come from sacrebleu's paired bootstrap: the scores it reports are the
corpus scores `score` computes, the interval contains the bootstrap mean, a system compared with
near copy is not significant, a clearly worse one is, and a run is reproducible."""

import pytest

from softprompt.loops.evaluate import paired_bootstrap, score

REFS = [["the cat sat on the mat", "a cat sat on a mat"], ["it is raining today", "today it rains"],
        ["hello world"], ["the shop opens at nine", "it opens at nine"]] * 8
GOOD = ["the cat sat on a mat", "it rains today", "hello world", "the shop opens at nine"] * 8
BAD = ["a dog is on the mat", "it is raining", "hi there", "open at ten"] * 8


def test_scores_are_the_corpus_scores_and_intervals_hold_them():
    res = paired_bootstrap({"good": GOOD, "bad": BAD}, REFS, baseline="good", n_samples=200)
    assert res["good"]["bleu"] == pytest.approx(score(GOOD, REFS)["bleu"], abs=1e-9)
    assert res["bad"]["bleu"] == pytest.approx(score(BAD, REFS)["bleu"], abs=1e-9)
    for r in res.values():
        assert r["bleu_low"] <= r["bleu_mean"] <= r["bleu_high"]
    assert res["good"]["p_value"] is None
    assert res["bad"]["p_value"] < 0.05  # far worse on every resample


def test_a_near_copy_is_not_significant_and_runs_repeat():
    near = list(GOOD)
    near[5] = "it is raining today"  # one output of 32 changed (and better)
    a = paired_bootstrap({"base": GOOD, "near": near}, REFS, baseline="base", n_samples=200)
    assert a["near"]["p_value"] > 0.05
    assert a == paired_bootstrap({"base": GOOD, "near": near}, REFS, baseline="base", n_samples=200)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="baseline"):
        paired_bootstrap({"a": GOOD}, REFS, baseline="b")
    with pytest.raises(ValueError, match="one output per input"):
        paired_bootstrap({"a": GOOD[:-1]}, REFS, baseline="a")
