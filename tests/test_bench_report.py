"""Benchmark results stay true: a --quick run never overwrites a full result, every result records
its run, and bench/README.md is exactly what bench/report.py makes of bench/results/."""

import json
import sys
from pathlib import Path

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
