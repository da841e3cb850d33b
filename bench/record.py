"""Where a benchmark's result goes, and what it records of the run, so that figures stay true.

    rec = Record("serve_mixed", quick=args.quick)   # at the start: the time and the load average
    ...
    rec.save(result, headline={"ratio_vs_base": 0.97, ...})

A `--quick` run (or any run whose options change what is measured: `full=False`) writes
`bench/results/NAME_quick.json` and never the full `NAME.json` that bench/README.md lists.
Every result carries `headline` (the figures of the last line) and `run`: date, command, seconds,
torch threads, CPU count, and the load average before and after (a figure from a busy machine
says so). `python bench/report.py` builds bench/README.md from the full results.

A benchmark's parts run as sections, so that one that fails loses only its own figures:

    sections = Sections(fail=args.fail_section)
    loads = sections("loads", load_times, model, tok, ...)     # None if it raised
    ...
    sys.exit(rec.finish(result, keys, sections))

A section that raises prints its traceback on stderr and is recorded under `errors` in the JSON;
`finish` saves the result all the same, prints the last line with every figure that was measured
(and `failed=NAME,...`), and returns the exit status: 1 where a section failed. `--fail-section
NAME` makes that section raise at its start, to show (tests/test_bench_report.py) that nothing
else is lost.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Record:
    def __init__(self, name: str, quick: bool, full: bool | None = None, results: Path = RESULTS):
        self.name, self.quick, self.results = name, quick, Path(results)
        self.full = (not quick) if full is None else full and not quick
        self.t0, self.started, self.load_before = time.time(), time.strftime("%Y-%m-%d %H:%M"), _load()

    @property
    def path(self) -> Path:
        return self.results / f"{self.name}{'' if self.full else '_quick'}.json"

    def save(self, result: dict, headline: dict, threads: int | str | None = None) -> Path:
        """Write `result` with its headline and run record; returns the path written."""
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        script = Path(sys.argv[0])
        run = {"date": self.started, "command": shlex.join(["python", f"bench/{script.name}", *sys.argv[1:]]),
               "full": self.full, "seconds": round(time.time() - self.t0, 1), "torch_threads": threads,
               "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "load_average_before": self.load_before, "load_average_after": _load()}
        self.results.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**result, "headline": headline, "run": run}, indent=1) + "\n")
        return self.path

    def finish(self, result: dict, keys: list[str], sections: "Sections | None" = None,
               threads: int | str | None = None) -> int:
        """Save `result` (with the failed sections' errors) and print the last line: `key=value` for
        each of `keys` that was measured, then `failed=...` if a section failed. Returns the exit
        status (0, or 1 where a section failed)."""
        errors = dict(sections.errors) if sections is not None else {}
        if errors:
            result = {**result, "errors": errors}
        headline = {k: result[k] for k in keys if result.get(k) is not None}
        out = self.save(result, headline=headline, threads=threads)
        print(f"wrote {out}", file=sys.stderr)
        line = [f"{k}={v}" for k, v in headline.items()]
        if errors:
            line.append(f"failed={','.join(errors)}")
            print(f"{len(errors)} section(s) failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()),
                  file=sys.stderr)
        print(" ".join(line), flush=True)
        return 1 if errors else 0


class SectionFailed(RuntimeError):
    """Raised by `--fail-section NAME` at the start of that section."""


class Sections:
    """Runs a benchmark's named parts; a part that raises is reported and skipped, not fatal."""

    def __init__(self, fail: str | None = None):
        self.fail = set(filter(None, (fail or "").split(",")))
        self.errors: dict[str, str] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None where it raised (the error kept under `name`)."""
        try:
            if name in self.fail:
                raise SectionFailed(f"--fail-section {name}")
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure stays in its section
            traceback.print_exc(file=sys.stderr)
            msg = str(e).strip().splitlines()
            self.errors[name] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]
            print(f"section {name} failed: {self.errors[name]}", file=sys.stderr, flush=True)
            return None


def add_fail_section(ap) -> None:
    """The `--fail-section` option every sectioned benchmark takes."""
    ap.add_argument("--fail-section", metavar="NAME[,NAME]",
                    help="make these sections fail at their start (to test that the rest is kept)")


def run_under_isa(script: str, isa: str, argv: list[str]) -> dict:
    """`script` run again as a child process under ISA `isa`'s environment
    (`softprompt.core.device.ISA_CAPS`: torch, oneDNN and MKL read it when they load), with `argv` and
    `--child ISA`; the child prints its result as JSON on its last line. Returns that result."""
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from softprompt.core.device import ISA_CAPS

    env = {**os.environ, **ISA_CAPS[isa]}
    done = subprocess.run([sys.executable, script, *argv, "--child", isa], env=env, stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {isa} run exited with status {done.returncode} (its error is above)")
    return json.loads(lines[-1])


def isa_list(ap, value: str) -> list[str]:
    """The ISAs named in `--isa` (comma-separated), each checked against softprompt.core.device.ISA_CAPS."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from softprompt.core.device import ISA_CAPS

    isas = [i.strip() for i in value.split(",") if i.strip()]
    unknown = [i for i in isas if i not in ISA_CAPS]
    if unknown or not isas:
        ap.error(f"unknown ISA {', '.join(unknown) or '(none)'}; use {', '.join(ISA_CAPS)}")
    return isas
