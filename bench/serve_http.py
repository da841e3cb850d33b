"""The HTTP server under load: requests/s and latency at 1, 8 and 32 concurrent clients, mixed tasks.

Starts `softprompt serve` in its own process on loopback over a fresh store of 16 tasks (prefix
tuning and prompt tuning, 10 and 20 virtual tokens) on the embedded SmolLM2-135M; each client
sends completions for a random task and an E2E prompt (16 new tokens, greedy) back to back.

    python bench/serve_http.py            # 30 s per concurrency level
    python bench/serve_http.py --quick    # 8 s per level
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from record import Record  # noqa: E402

E2E = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"


def make_store(store_dir: Path, n_tasks: int) -> list[str]:
    from serve_mixed import task_prompt

    from softprompt.io.artifact import save_artifact
    from softprompt.io.load import load_base
    from softprompt.store.core import Store

    model, tok = load_base()
    store, names = Store(store_dir), []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_tasks):
            prompt = task_prompt(model, tok, i)  # the same tasks as bench/serve_mixed.py
            path = save_artifact(prompt, Path(tmp) / f"t{i}.safetensors", model)
            store.add(f"task{i:02d}", path)
            names.append(f"task{i:02d}")
    return names


def prompts(n: int, rng: random.Random) -> list[str]:
    import csv

    if E2E.exists():
        with open(E2E, newline="", encoding="utf-8") as f:
            mrs = sorted({row["mr"] for row in csv.DictReader(f)})
        return [m + " ||" for m in rng.sample(mrs, min(n, len(mrs)))]
    return [f"name[Place {i}], food[French], area[riverside] ||" for i in range(n)]


def load(url: str, clients: int, seconds: float, names: list[str], texts: list[str], tokens: int) -> dict:
    lat, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(seed):
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=300) as c:
            while time.perf_counter() < deadline:
                body = {"model": rng.choice(names), "prompt": rng.choice(texts), "max_tokens": tokens,
                        "temperature": 0}
                t0 = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    (lat if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.status_code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    p = lambda q: round(1e3 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None  # noqa: E731
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "rps": round(len(lat) / wall, 2),
            "p50_ms": p(0.5), "p99_ms": p(0.99), "mean_ms": round(1e3 * statistics.mean(lat), 1) if lat else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 8
    load_before = os.getloadavg()[0]  # figures taken on a busy CPU mean little: record how busy it was
    rec = Record("serve_http", quick=args.quick)
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="serve_http_"))
    names = make_store(work / "store", args.tasks)
    texts = prompts(64, rng)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--store", str(work / "store"),
                               "--port", str(port), "--max-batch-size", "32", "--threads", str(args.threads)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("server did not start:\n" + (work / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        load(url, 4, 3, names, texts, args.tokens)  # warm-up: every task's prefix compiled and cached
        levels = [load(url, c, args.seconds, names, texts, args.tokens) for c in (1, 8, 32)]
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(30)
    for lv in levels:
        print(f"{lv['clients']:>3} clients: {lv['rps']:>6} req/s  p50 {lv['p50_ms']} ms  p99 {lv['p99_ms']} ms  "
              f"({lv['requests']} requests, {lv['errors']} errors)", file=sys.stderr)
    mean_batch = next((line.split()[-1] for line in metrics.splitlines() if line.startswith("softprompt_mean_batch_rows")),
                      None)
    result = {"levels": levels, "tasks": args.tasks, "max_tokens": args.tokens, "seconds_per_level": args.seconds,
              "mean_batch_rows": mean_batch, "quick": args.quick, "threads": args.threads,
              "load_average_before": load_before}
    by = {lv["clients"]: lv for lv in levels}
    rec.save(result, headline={f"{k}_{c}": by[c][k] for c in (32, 8, 1) for k in ("rps", "p99_ms", "p50_ms")},
             threads=args.threads or "torch default (server)")
    print(" ".join([f"rps_32={by[32]['rps']}", f"p99_ms_32={by[32]['p99_ms']}", f"p50_ms_32={by[32]['p50_ms']}",
                    f"rps_8={by[8]['rps']}", f"p99_ms_8={by[8]['p99_ms']}", f"rps_1={by[1]['rps']}",
                    f"p99_ms_1={by[1]['p99_ms']}", f"errors={sum(lv['errors'] for lv in levels)}"]))


if __name__ == "__main__":
    main()
