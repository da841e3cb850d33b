"""`softprompt serve --backend vllm` with real vLLM (its CPU build in .venv-vllm, made by
scripts/setup-vllm.sh): the command starts vLLM with our connector, and an OpenAI client sent
requests for three tasks (prefix tuning, prompt tuning, P-tuning) and the bare model at once gets,
for each, the greedy text our own engine makes for it, in float32 on the embedded model; each
task changes the bare model's answer to some prompt, so a prefix vLLM ignored could not pass. Stopping the
server stops vLLM. About 3-5 minutes on 2 cores (vLLM's start-up). Skipped, saying why, where
.venv-vllm is missing (.ci/run makes it first, then runs this file)."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.embedded

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "with_vllm"))
NEW_TOKENS = 8


def vllm_python() -> Path:
    from softprompt.serve.vllm_backend import find_vllm_python

    try:
        py = find_vllm_python()
    except ValueError as e:
        pytest.skip(str(e))
    probe = subprocess.run([str(py), "-c", "import vllm, softprompt.vllm.connector"], capture_output=True, text=True,
                           timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if probe.returncode != 0:
        pytest.skip(f"vLLM does not import in {py}: {probe.stderr.strip().splitlines()[-1:]}")
    return py


def get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    py = vllm_python()
    import softprompt as sp
    from make_reference import PROMPTS, TASKS, make_tasks

    from softprompt.serve import Engine, Request
    from softprompt.serve.tasks import TaskRegistry

    out = tmp_path_factory.mktemp("sv")
    model, tok = sp.load_base(dtype="float32")
    store = make_tasks(model, out)
    engine = Engine(model, tok, TaskRegistry(fallback=store.entry))  # what `softprompt serve` runs by default
    reference = {}
    for task in [None] + [name for name, *_ in TASKS]:
        for text in PROMPTS[:2]:
            res = engine.generate([Request(prompt=text, task=task, max_new_tokens=NEW_TOKENS, ignore_eos=True)])[0]
            assert res.error is None, res.error
            reference[(task, text)] = res.text
    del engine, model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log = open(out / "serve.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("softprompt")), "serve", "--backend", "vllm", "--store",
                             str(out / "store"), "--port", str(port), "--vllm-python", str(py),
                             "--max-batch-size", "8", "--vllm-max-model-len", "512"], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, (out / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up in 15 minutes"
            try:
                if get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        yield url, reference, proc, out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_an_openai_client_gets_our_engines_text_for_every_task_in_one_batch(served):
    from openai import OpenAI

    url, reference, _, _ = served
    status, health = get(url + "/health")
    assert status == 200 and health["backend"] == "vllm"
    client = OpenAI(base_url=url + "/v1", api_key="-")

    def ask(key):
        task, text = key
        r = client.completions.create(model=task or "SmolLM2-135M-Instruct", prompt=text, max_tokens=NEW_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].text

    keys = list(reference)
    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:  # all in flight together: one vLLM batch
        got = dict(zip(keys, pool.map(ask, keys)))
    assert got == reference
    for task in {t for t, _ in keys} - {None}:  # each task changes some answer: an ignored prefix could not pass
        assert any(got[(task, text)] != got[(None, text)] for _, text in keys), f"{task} gave the bare model's texts"
    # again: the tasks' prefixes now come from vLLM's prefix cache (or the connector again), same text
    assert ask(keys[-1]) == reference[keys[-1]]


def test_stopping_the_server_stops_vllm(served):
    url, _, proc, out = served
    proc.terminate()
    proc.wait(60)
    text = (out / "serve.log").read_text()
    assert "starting vLLM" in text
    log_path = text.split("log ", 1)[1].split(")", 1)[0]
    assert not Path(log_path).exists()  # the child's folder went with it
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-f", f"--kv-transfer-config.*{out / 'store'}"], capture_output=True,
                              text=True).stdout.split()
    assert leftover == [], f"vLLM processes left running: {leftover}"
