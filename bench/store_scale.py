"""The prompt store at scale: fill a store with 10,000 tasks, then time listing and opening.

Tasks have the embedded model's real geometry (SmolLM2-135M: 30 layers, 3 KV heads of 64, hidden
576) at P = 20, without loading the model: a config-only stand-in carries the geometry and a fixed
fingerprint, which is all `store.add` and `store.open` read. One task in ten is prefix tuning
(921,600 tensor bytes), the rest prompt tuning (46,080 bytes); ~1.3 GB on disk, each with its own
random tensors. Each add is the full path a user takes (`store.add(name, prompt, model)`: serialize,
checksum, fsync, rename, one SQLite transaction).

Measured: adds per second; `Store(root).ls()` (a fresh connection, latest version per name, all
10,000 rows as dicts) and `ls(all_versions=True)`; 200 random `open`s (index lookup, sha256 of the
file against the index, `load_artifact`'s checksum, parse and rebuild), p50/p99 overall and for
the prefix-tuning tasks; `version_token()`. Files were just written, so they are in the page
cache, as a serving process's working set would be.

Both index backends, side by side, on the same tasks: SQLite (the default) and PostgreSQL (a
throwaway local server this script starts, as tests/services.py does; or `--pg DSN`), each with its
files in a local directory, so the difference is the index alone. The top-level keys are SQLite's
(as before); "postgresql" holds the same measures for PostgreSQL.

    python bench/store_scale.py            # 10,000 tasks per backend (~4 min on 2 CPU cores)
    python bench/store_scale.py --quick    # 500 tasks per backend
    python bench/store_scale.py --no-pg    # SQLite only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from record import Record  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from softprompt.core.geometry import geometry
from softprompt.methods import PrefixTuning, PromptTuning  # noqa: E402
from softprompt.store.core import Store


def stand_in():
    """A config-only base model with the embedded model's geometry (nothing else is read)."""
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192)
    fp = "sha256:" + hashlib.sha256(b"store_scale stand-in").hexdigest()[:32]
    return SimpleNamespace(config=cfg, name_or_path="SmolLM2-135M-Instruct (geometry only)",
                           _softprompt_fingerprint=fp)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 tasks per backend")
    ap.add_argument("--pg", default=None, help="a PostgreSQL DSN to use (default: start a throwaway server)")
    ap.add_argument("--no-pg", action="store_true", help="measure SQLite only")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--opens", type=int, default=200)
    ap.add_argument("--dir", default=None, help="store directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    n = args.tasks or (500 if args.quick else 10_000)
    rec = Record("store_scale", quick=args.quick, full=n == 10_000)
    torch.set_num_threads(1)
    result = measure(n, args.opens, args.dir, None)
    if not args.no_pg:
        server = None
        try:
            if args.pg is None:
                sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
                from services import Postgres, new_database

                server = Postgres()
                dsn = new_database(server.dsn)
            else:
                dsn = args.pg
            result["postgresql"] = measure(n, args.opens, None, dsn)
        finally:
            if server is not None:
                server.close()
    print(json.dumps(result, indent=2), file=sys.stderr)
    # --quick writes its own file, so it never overwrites the 10,000-task figures the README quotes
    keys = ["open_p99_ms", "list_s", "open_p50_ms", "add_per_s"]
    headline = {k: result[k] for k in keys}
    if "postgresql" in result:
        headline.update({f"pg_{k}": result["postgresql"][k] for k in keys})
    rec.save(result, headline=headline)
    print(" ".join(f"{k}={v}" for k, v in headline.items()))


def measure(n: int, opens: int, directory: str | None, dsn: str | None) -> dict:
    """Fill one store (SQLite in `directory`, or PostgreSQL at `dsn` with files in a temp dir) and time it."""
    model = stand_in()
    geo = geometry(model)
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="store_scale."))
    try:
        store = Store(dsn, str(root)) if dsn else Store(root)
        again = (lambda: Store(dsn)) if dsn else (lambda: Store(root))
        prefix = PrefixTuning.from_export(geo, {"num_virtual_tokens": 20},
                                          {"prefix": torch.zeros(geo.prefix_shape(20))})
        prompt = PromptTuning.from_export(geo, {"num_virtual_tokens": 20, "init": "random"},
                                          {"prompt_embeddings": torch.zeros(20, geo.hidden_size)})
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for i in range(n):
            p = prefix if i % 10 == 0 else prompt
            with torch.no_grad():
                for param in p.parameters():
                    param.normal_(0, 1, generator=g)
            # the index and files only: the serving form (a forward pass per prompt-tuning task) is
            # measured by serve_mixed.py
            store.add(f"task-{i:05d}", p, model, tags=[f"group-{i % 7}"], metrics={"score": i / n}, compile=False)
            if (i + 1) % 1000 == 0:
                print(f"  added {i + 1} ({(i + 1) / (time.perf_counter() - t0):.0f}/s)", file=sys.stderr)
        add_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows = again().ls()
        list_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        all_rows = store.ls(all_versions=True)
        list_all_s = time.perf_counter() - t0
        assert len(rows) == len(all_rows) == n
        t0 = time.perf_counter()
        tagged = store.ls(tag="group-3")
        list_tag_s = time.perf_counter() - t0

        rng = random.Random(0)
        times, prefix_times = [], []
        for _ in range(opens):
            i = rng.randrange(n)
            ref = f"task-{i:05d}" if rng.random() < 0.5 else f"task-{i:05d}@1"
            t0 = time.perf_counter()
            store.open(ref, model)
            dt = (time.perf_counter() - t0) * 1e3
            times.append(dt)
            if i % 10 == 0:
                prefix_times.append(dt)
        t0 = time.perf_counter()
        for _ in range(1000):
            store.version_token()
        token_us = (time.perf_counter() - t0) * 1e3

        disk = sum(p.stat().st_size for p in (root / "objects").glob("*/*"))
        if dsn:
            disk += store._db().execute("SELECT pg_database_size(current_database())").fetchone()[0]
        else:
            disk += (root / "index.sqlite").stat().st_size
        result = {
            "index": "postgresql (local server, loopback TCP)" if dsn else "sqlite (WAL)",
            "tasks": n, "prefix_tuning_tasks": (n + 9) // 10, "num_virtual_tokens": 20,
            "geometry": "SmolLM2-135M (30 layers, 3 KV heads x 64, hidden 576), config-only stand-in",
            "add_per_s": round(n / add_s, 1), "add_s": round(add_s, 1),
            "list_s": round(list_s, 4), "list_all_versions_s": round(list_all_s, 4),
            "list_tag_s": round(list_tag_s, 4), "tagged": len(tagged),
            "opens": len(times), "open_p50_ms": round(statistics.median(times), 2),
            "open_p99_ms": round(pct(times, 99), 2), "open_max_ms": round(max(times), 2),
            "open_prefix_p50_ms": round(statistics.median(prefix_times), 2) if prefix_times else None,
            "open_prefix_p99_ms": round(pct(prefix_times, 99), 2) if prefix_times else None,
            "version_token_us": round(token_us, 1), "disk_bytes": disk,
            "cpu_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    finally:
        if not directory:
            shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
