"""Where a benchmark's result goes, and what it records of the run, so that figures stay true.

    rec = Record("serve_mixed", quick=args.quick)   # at the start: the time and the load average
    ...
    rec.save(result, headline={"ratio_vs_base": 0.97, ...})

A `--quick` run (or any run whose options change what is measured: `full=False`) writes
`bench/results/NAME_quick.json` and never the full `NAME.json` that bench/README.md lists.
Every result carries `headline` (the figures of the last line) and `run`: date, command, seconds,
torch threads, CPU count, and the load average before and after (a figure from a busy machine
says so). `python bench/report.py` builds bench/README.md from the full results.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
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
