"""How long `softprompt --help` and each command's `--help` take, as whole processes (what a user
waits for). Nothing heavy may load before a command runs, so each should answer in well under a
second; the same interpreter's bare start-up is measured beside them for scale.

    python bench/cli_help.py [--quick]       # --quick: 3 runs each instead of 10

Last line: `help_median_s=.. help_max_median_s=.. python_startup_s=..` (the slowest command's median).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import Record  # noqa: E402


def timed(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rec = Record("cli_help", quick=args.quick)
    runs = 3 if args.quick else 10
    py = [sys.executable]
    from softprompt.cli import COMMANDS

    commands = [[]] + [[name] for name in COMMANDS]
    medians = {" ".join(c) or "(top)": timed(py + ["-m", "softprompt.cli", *c, "--help"], runs) for c in commands}
    startup = timed(py + ["-c", "pass"], runs)
    top, worst = medians["(top)"], max(medians.values())
    for name, t in medians.items():
        print(f"{name:14s} {t * 1000:7.1f} ms")
    rec.save({"medians_s": medians, "python_startup_s": startup, "runs": runs},
             headline={"help_median_s": round(top, 3), "help_max_median_s": round(worst, 3),
                       "python_startup_s": round(startup, 3)}, threads="n/a")
    print(f"help_median_s={top:.3f} help_max_median_s={worst:.3f} python_startup_s={startup:.3f}")


if __name__ == "__main__":
    main()
