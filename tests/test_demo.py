"""`softprompt demo` does what the README says: on the embedded SmolLM2-135M-Instruct, the bare model
matches none of the 16 held-out weather reports exactly and the trained prefix (30 steps) matches
every one. It trains the real model (about a minute on 2 quiet cores, 9 on 2 cores shared with three
other test runs), so it is marked `embedded`."""

import pytest

pytestmark = pytest.mark.embedded


def test_demo_goes_from_0_to_100_percent_exact_match(tmp_path, monkeypatch):
    from softprompt.runs.demo import run_demo

    monkeypatch.setattr("softprompt.loops.train.plot_history", lambda *a, **k: None)  # the plot is not the claim
    res = run_demo(out=str(tmp_path / "demo"))
    assert res["before"]["exact_match"] == 0.0
    assert res["after"]["exact_match"] == 100.0
    assert res["after"]["bleu"] == pytest.approx(100.0)
    assert (tmp_path / "demo" / "best" / "card.json").is_file()
