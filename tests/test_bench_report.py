"""Benchmark results stay true: a --quick run never overwrites a full result, every result records
its run, and bench/README.md is exactly what bench/report.py makes of bench/results/."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import record  # noqa: E402
import report  # noqa: E402


def test_a_quick_run_writes_its_own_file_with_a_run_record(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench/serve_mixed.py", "--quick"])
    full = tmp_path / "serve_mixed.json"
    full.write_text('{"ratio_vs_base": 0.975}')
    path = record.Record("serve_mixed", quick=True, results=tmp_path).save({"x": 1}, headline={"x": 1}, threads=1)
    assert path == tmp_path / "serve_mixed_quick.json" and full.read_text() == '{"ratio_vs_base": 0.975}'
    run = json.loads(path.read_text())["run"]
    assert run["command"] == "python bench/serve_mixed.py --quick" and run["torch_threads"] == 1
    assert len(run["load_average_before"]) == len(run["load_average_after"]) == 3 and not run["full"]
    # options that change what is measured make a run not-full too
    assert record.Record("serve_mixed", quick=False, full=False, results=tmp_path).path.name == "serve_mixed_quick.json"
    assert record.Record("serve_mixed", quick=False, results=tmp_path).path == full


def test_bench_readme_is_generated_from_the_results():
    assert (BENCH / "README.md").read_text() == report.render(), "run `python bench/report.py`"
    names = {p.stem for p in (BENCH / "results").glob("*.json") if not p.stem.endswith("_quick")}
    assert names <= set(report.BENCHES) and all(f"### {n}" in report.render() for n in names)


def test_a_failed_section_loses_only_its_own_figures(tmp_path, monkeypatch, capsys):
    """The section's error goes to stderr and the JSON; the last line still carries every figure
    measured, says which section failed, and the exit status is 1."""
    monkeypatch.setattr(sys, "argv", ["bench/x.py", "--quick"])
    sections = record.Sections(fail="second")
    first = sections("first", lambda: {"a": 1.5})
    second = sections("second", lambda: {"b": 2})  # told to fail at its start
    third = sections("third", lambda: 1 / 0)
    assert first == {"a": 1.5} and second is None and third is None
    rec = record.Record("x", quick=True, results=tmp_path)
    status = rec.finish({**first, "c": 3}, ["a", "b", "c"], sections, threads=1)
    out, err = capsys.readouterr()
    assert status == 1
    assert out.strip().splitlines()[-1] == "a=1.5 c=3 failed=second,third"
    assert "ZeroDivisionError" in err and "section third failed" in err
    saved = json.loads((tmp_path / "x_quick.json").read_text())
    assert saved["errors"] == {"second": "SectionFailed: --fail-section second",
                               "third": "ZeroDivisionError: division by zero"}
    assert saved["headline"] == {"a": 1.5, "c": 3}
    assert record.Record("y", quick=True, results=tmp_path).finish({"a": 1}, ["a"], record.Sections(), threads=1) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "a=1"


@pytest.mark.embedded
def test_serve_mixed_prints_its_last_line_when_the_quantized_section_fails(tmp_path):
    """The whole benchmark, tiny, with its int8 section made to fail: every other figure survives."""
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCH / "serve_mixed.py"), "--quick", "--tasks", "4", "--requests", "4",
                           "--new-tokens", "2", "--rounds", "1", "--load-rounds", "1", "--loads", "2", "--threads", "1",
                           "--fail-section", "quantized"], env=env, capture_output=True, text=True, timeout=900)
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-3000:]
    figures = dict(kv.split("=", 1) for kv in last.split())
    assert figures.pop("failed") == "quantized"
    assert "quantized_vs_fp32_base" not in figures
    assert {"ratio_vs_base", "speedup_vs_peft", "task_load_p99_ms", "tokens_per_s_engine"} <= set(figures)
    assert "section quantized failed: SectionFailed" in done.stderr
