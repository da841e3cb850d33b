"""Ray Serve under load: the plain server vs 1 and 2 Ray Serve replicas, over one PostgreSQL store.

A throwaway PostgreSQL (as tests/services.py starts it) holds the index of N tasks (prefix tuning
and prompt tuning, 10/20 virtual tokens, compiled at publish) for the embedded SmolLM2-135M; the
bytes are in a local directory. The same client load (C clients, each sending greedy completions
of 16 tokens for a random task, back to back) runs against:

    plain      `softprompt serve --store DSN --threads 1` (one process, uvicorn)
    ray x1     `softprompt serve --ray --replicas 1` equivalent (Ray Serve proxy -> Ingress -> 1 replica)
    ray x2     the same with 2 replicas

plain vs ray x1 is the cost of routing through Ray (proxy + ingress + handle hops, serialization);
ray x1 vs ray x2 is what a second replica buys on this machine. Each replica gets one torch thread.

    python bench/serve_ray.py            # 32 clients, 64 tasks, 30 s per run
    python bench/serve_ray.py --quick    # 32 clients, 16 tasks, 6 s per run
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from record import Record  # noqa: E402
from serve_http import load, prompts  # noqa: E402


def make_store(dsn: str, objects: Path, n_tasks: int) -> list[str]:
    from serve_mixed import task_prompt

    from softprompt.io.load import load_base
    from softprompt.store.core import Store

    model, tok = load_base()
    store = Store(dsn, str(objects))
    for i in range(n_tasks):
        store.add(f"task{i:02d}", task_prompt(model, tok, i), model)  # compiled at publish
    return [f"task{i:02d}" for i in range(n_tasks)]


def wait_ready(url: str, proc=None, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    raise SystemExit(f"server at {url} did not start")


def run_load(url, args, names, texts) -> dict:
    load(url, 8, 3, names, texts, args.tokens)  # warm-up: every replica's tasks loaded, code paths hot
    one = load(url, 1, max(3, args.seconds / 3), names, texts, args.tokens)
    many = load(url, args.clients, args.seconds, names, texts, args.tokens)
    return {"1_client": one, f"{args.clients}_clients": many}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.tasks = 6, 16
    from services import Postgres, free_port, new_database

    load_before = os.getloadavg()[0]
    rec = Record("serve_ray", quick=args.quick)
    work = Path(tempfile.mkdtemp(prefix="serve_ray_"))
    pg = Postgres()
    results = {}
    try:
        dsn = new_database(pg.dsn)
        names = make_store(dsn, work / "objects", args.tasks)
        texts = prompts(64, random.Random(0))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--store", dsn, "--port", str(port),
                                   "--max-batch-size", "32", "--threads", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=open(work / "server.log", "w"))
        try:
            wait_ready(url, server)
            results["plain"] = run_load(url, args, names, texts)
        finally:
            server.terminate()
            server.wait(30)

        import ray
        from ray import serve

        from softprompt.serve.ray_app import build

        ray.init(num_cpus=4, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
        try:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for n in (1, 2):
                serve.run(build(dsn, None, replicas=n, threads=1, replica_cpus=1, max_batch_size=32),
                          name="softprompt", route_prefix="/")
                wait_ready(url)
                results[f"ray_x{n}"] = run_load(url, args, names, texts)
                serve.delete("softprompt")
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        pg.close()
    key = f"{args.clients}_clients"
    for name, r in results.items():
        for level, lv in r.items():
            print(f"{name:>7} {level:>11}: {lv['rps']:>6} req/s  p50 {lv['p50_ms']} ms  p99 {lv['p99_ms']} ms  "
                  f"({lv['requests']} requests, {lv['errors']} errors)", file=sys.stderr)
    plain1, ray1 = results["plain"]["1_client"], results["ray_x1"]["1_client"]
    result = {"runs": results, "tasks": args.tasks, "clients": args.clients, "max_tokens": args.tokens,
              "seconds_per_run": args.seconds, "quick": args.quick, "cpu_cores": os.cpu_count(),
              "load_average_before": load_before,
              "ray_routing_overhead_ms_p50": round(ray1["p50_ms"] - plain1["p50_ms"], 1),
              "store": "PostgreSQL 15 (local) + local directory"}
    headline = {f"{name}_rps": r[key]["rps"] for name, r in results.items()}
    headline.update({f"{name}_p99_ms": r[key]["p99_ms"] for name, r in results.items()})
    headline["ray_routing_overhead_ms_p50"] = result["ray_routing_overhead_ms_p50"]
    rec.save(result, headline=headline, threads=1)
    print(" ".join(f"{k}={v}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
