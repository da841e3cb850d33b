"""A bounded load test on loopback: 32 concurrent clients for 60 s over 16 tasks (tiny model).
No 5xx; every completed answer equals the same request run alone; memory stays bounded; the
server still answers afterwards."""

import os
import random
import resource
import threading
import time

import httpx
import pytest
from conftest import tiny_model
from test_http import CHAT_TEMPLATE, Server, make_tasks
from tiny_tokenizer import WORDS, tiny_tokenizer

from softprompt.serve import Engine, Request
from softprompt.serve.http import ServerConfig, create_app

CLIENTS = 32
SECONDS = float(os.environ.get("SOFTPROMPT_LOAD_SECONDS", 60))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.load
def test_32_clients_for_60_seconds():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tasks = make_tasks(model, 16)
    engine = Engine(model, tok, dict(tasks), max_batch_size=16, max_queue=64)
    prompts = [" ".join(random.Random(i).choices(WORDS, k=2 + i % 9)) for i in range(12)]
    results, statuses, errors = [], [], []
    lock = threading.Lock()
    rss = []

    def client(seed: int, url: str, deadline: float):
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.time() < deadline:
                task = rng.choice([*tasks, "base"])
                prompt, n = rng.choice(prompts), rng.randint(1, 12)
                try:
                    r = c.post("/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": n,
                                                        "temperature": 0})
                except httpx.HTTPError as e:
                    with lock:
                        errors.append(repr(e))
                    continue
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        results.append((task, prompt, n, r.json()["choices"][0]["text"]))
                if r.status_code == 429:
                    time.sleep(float(r.headers.get("retry-after", 1)) * rng.random())

    app = create_app(engine, config=ServerConfig(base_model_id="base"))
    with Server(app) as url:
        rss.append(rss_mb())
        deadline = time.time() + SECONDS
        threads = [threading.Thread(target=client, args=(i, url, deadline)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            rss.append(rss_mb())
        for t in threads:
            t.join()
        after = httpx.get(url + "/health", timeout=10)
        assert after.status_code == 200 and after.json()["status"] == "ok"
        assert engine.status()["running_rows"] == 0 and engine.status()["waiting"] == 0

    assert not errors, errors[:3]
    assert not [s for s in statuses if s >= 500]
    assert len(results) > 100, f"only {len(results)} answers in {SECONDS} s"
    # every completed answer equals the same request run alone (greedy), checked per distinct request
    alone = Engine(model, tok, dict(tasks))
    expected = {}
    for task, prompt, n, text in results:
        key = (task, prompt, n)
        if key not in expected:
            req = Request(prompt=prompt, task=None if task == "base" else task, max_new_tokens=n)
            expected[key] = alone.generate([req])[0].text
        assert text == expected[key], key
    # memory stays bounded: the second half of the run grows by less than 100 MB over the first
    half = len(rss) // 2
    assert max(rss[half:]) - max(rss[:half]) < 100, (rss[0], max(rss))
