"""`softprompt serve --backend vllm` without vLLM: the engine (serve/vllm_backend.py) drives a stand-in
child (tests/fake_vllm.py) that takes vLLM's arguments and streams as vLLM's OpenAI server does. What
is checked is what our side owns: a task request reaches vLLM as the task version's placeholder ids
followed by the prompt's ids and names its task in kv_transfer_params; sampling fields go over with
their meaning; the compiled prefix is in the store before vLLM is asked; what cannot be served is a
400 naming why; vLLM's own 400 is the client's 400; a crashed child fails only its running request,
/health says 503 until it is back, and the next request is served. The same API with real vLLM:
tests/test_serve_vllm.py."""

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import VOCAB, tiny_model
from starlette.testclient import TestClient

from softprompt import methods
from softprompt.core.geometry import model_fingerprint
from softprompt.core.placeholders import placeholder_ids
from softprompt.io.artifact import save_artifact
from softprompt.serve.http import ServerConfig, create_app
from softprompt.serve.tasks import TaskRegistry
from softprompt.serve.vllm_backend import VllmEngine, VllmOptions, VllmServer, find_vllm_python
from softprompt.store.core import Store

FAKE = Path(__file__).with_name("fake_vllm.py")


def expected(prompt_ids, n):
    return [(sum(prompt_ids) + i) % 50 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tiny_tokenizer import tiny_tokenizer

    tmp = tmp_path_factory.mktemp("vb")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    store = Store(tmp / "store")
    for i, (name, method, P) in enumerate([("alpha", "prefix_tuning", 3), ("beta", "prompt_tuning", 5)]):
        opts = dict(projection_dim=0) if method == "prefix_tuning" else {}
        prompt = methods.create(method, model, num_virtual_tokens=P, seed=i, **opts)
        store.add(name, save_artifact(prompt, tmp / f"{name}.safetensors", model), model)
    mem = methods.create("prompt_tuning", model, num_virtual_tokens=2, seed=9)
    log = tmp / "requests.jsonl"
    log.touch()
    opts = VllmOptions(python=Path(sys.executable), model_dir=tmp / "model", dtype="float32", store_root=store.root,
                       base_fingerprint=model_fingerprint(model), max_model_len=64, max_num_seqs=4,
                       startup_timeout_s=60, command=(sys.executable, str(FAKE)), env={"FAKE_VLLM_LOG": str(log)})
    server = VllmServer(opts)
    engine = VllmEngine(model, tok, TaskRegistry({"mem": mem}, fallback=store.entry), server=server, max_batch_size=4)
    with TestClient(create_app(engine, store, ServerConfig(base_model_id="base"))) as client:
        yield client, engine, store, tok, log
    assert not server.alive  # the app's shutdown stopped the child


def sent(log: Path) -> list[dict]:
    return [json.loads(ln) for ln in log.read_text().splitlines()]


def complete(client, **body):
    return client.post("/v1/completions", json={"max_tokens": 4, "temperature": 0, **body})


def test_a_task_reaches_vllm_as_its_placeholders_then_the_prompt(served):
    client, engine, store, tok, log = served
    before = len(sent(log))
    r = complete(client, model="alpha", prompt="ka mo")
    assert r.status_code == 200, r.text
    body = sent(log)[before]
    entry = store.show("alpha")
    head = placeholder_ids(entry["sha256"], 3, VOCAB)
    ids = tok("ka mo", add_special_tokens=False)["input_ids"]
    assert body["prompt"] == head + ids
    assert body["kv_transfer_params"] == {"softprompt": {"task": "alpha@1", "sha256": entry["sha256"],
                                                         "num_virtual_tokens": 3}}
    assert body["stream"] is True and body["return_token_ids"] is True
    out = r.json()
    want = expected(head + ids, 4)
    assert out["choices"][0]["text"] == "".join(f" w{t}" for t in want)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 4, "total_tokens": len(ids) + 4}
    # the connector reads the compiled prefix from the store: it is there, for this base and dtype
    assert any((store.root / "compiled").rglob(f"{entry['sha256']}.float32.safetensors"))


def test_the_base_model_has_no_placeholders_and_names_no_task(served):
    client, _, _, tok, log = served
    before = len(sent(log))
    assert complete(client, model="base", prompt="ka mo").status_code == 200
    body = sent(log)[before]
    assert body["prompt"] == tok("ka mo", add_special_tokens=False)["input_ids"]
    assert "kv_transfer_params" not in body


def test_two_tasks_in_flight_together_each_with_its_own_placeholders(served, monkeypatch):
    client, _, store, tok, log = served
    before = len(sent(log))
    results = {}

    def ask(name):
        results[name] = complete(client, model=name, prompt="ka mo", max_tokens=6)

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = tok("ka mo", add_special_tokens=False)["input_ids"]
    bodies = {b["kv_transfer_params"]["softprompt"]["task"]: b for b in sent(log)[before:]}
    for name, P in (("alpha", 3), ("beta", 5)):
        head = placeholder_ids(store.show(name)["sha256"], P, VOCAB)
        assert bodies[f"{name}@1"]["prompt"] == head + ids
        assert results[name].json()["choices"][0]["text"] == "".join(f" w{t}" for t in expected(head + ids, 6))


def test_sampling_fields_go_over_with_their_meaning(served):
    client, _, _, _, log = served
    before = len(sent(log))
    r = complete(client, model="base", prompt="ka", temperature=0.7, top_p=0.9, top_k=5, seed=7, stop=["zz"],
                 presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.2, min_tokens=2,
                 min_p=0.1, stop_token_ids=[5], logit_bias={"7": 3}, ignore_eos=True, logprobs=2)
    assert r.status_code == 200, r.text
    body = sent(log)[before]
    for k, v in dict(temperature=0.7, top_p=0.9, top_k=5, seed=7, stop=["zz"], presence_penalty=0.5,
                     frequency_penalty=0.25, repetition_penalty=1.2, min_tokens=2, min_p=0.1, stop_token_ids=[5],
                     logit_bias={"7": 3.0}, ignore_eos=True, logprobs=2, return_tokens_as_token_ids=True,
                     max_tokens=4).items():
        assert body[k] == v, k
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-0.25] * 4
    assert all(len(top) == 2 for top in lp["top_logprobs"])  # the two likeliest of vLLM's three


def test_what_cannot_be_served_is_a_400_saying_why(served):
    client, _, _, _, log = served
    before = len(sent(log))
    r = complete(client, model="alpha", prompt="ka", repetition_penalty=1.3)
    assert r.status_code == 400 and "placeholder ids as prompt tokens" in r.json()["error"]["message"]
    r = complete(client, model="alpha", prompt="ka", echo=True, logprobs=1)
    assert r.status_code == 400 and "--backend vllm" in r.json()["error"]["message"]
    r = complete(client, model="mem", prompt="ka")
    assert r.status_code == 400 and "not in the store" in r.json()["error"]["message"]
    r = complete(client, model="alpha", prompt="ka", max_tokens=62)  # 3 + 1 + 62 > 64
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    assert len(sent(log)) == before  # none of them reached vLLM


def test_vllms_own_400_is_the_clients_400(served):
    client, *_ = served
    r = complete(client, model="alpha", prompt="ka", seed=400)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "vLLM refused the request: fake vLLM refuses seed 400"


def test_streaming_gives_the_same_text(served):
    client, *_ = served
    plain = complete(client, model="beta", prompt="ka mo").json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"model": "beta", "prompt": "ka mo", "max_tokens": 4,
                                                         "temperature": 0, "stream": True}) as r:
        parts = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert "".join(p["choices"][0]["text"] for p in parts) == plain


def test_a_damaged_compiled_file_is_recompiled_before_vllm_reads_it(served):
    client, engine, store, _, _ = served
    sha = store.show("beta")["sha256"]
    path = next((store.root / "compiled").rglob(f"{sha}.float32.safetensors"))
    good = path.read_bytes()
    engine.prefixes._items.clear()  # as after a restart: the engine asks the store again
    path.write_bytes(good[:-8] + b"\0" * 8)
    assert complete(client, model="beta", prompt="ka").status_code == 200
    assert path.read_bytes() == good


def test_a_crashed_vllm_fails_its_request_only_and_is_restarted(served):
    client, engine, *_ = served
    starts = engine.server.starts
    r = complete(client, model="alpha", prompt="ka", seed=500)  # the child exits after one token
    assert r.status_code == 500 and "vLLM" in r.json()["error"]["message"]
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:  # 503 while it restarts
        assert time.monotonic() < deadline, "vLLM was not restarted"
        time.sleep(0.2)
    assert engine.server.starts == starts + 1 and engine.stats["vllm_restarts"] >= 1
    assert complete(client, model="alpha", prompt="ka").status_code == 200


def test_find_vllm_python_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.delenv("SOFTPROMPT_VLLM_PYTHON", raising=False)
    with pytest.raises(ValueError, match="bash scripts/setup-vllm.sh"):
        find_vllm_python(str(tmp_path / "nope"))
    monkeypatch.setenv("SOFTPROMPT_VLLM_PYTHON", sys.executable)
    assert find_vllm_python() == Path(sys.executable)


@pytest.mark.parametrize("opts, why", [
    (dict(quantize="int8"), "--quantize int8"), (dict(ray=True), "--ray"), (dict(lora="x"), "--lora"),
    (dict(off_task="reject"), "--backend torch"), (dict(backend="tgi"), "backend must be one of")])
def test_serve_config_refuses_what_the_vllm_backend_cannot_do(opts, why):
    from softprompt.serve.config import ServeConfig

    with pytest.raises(ValueError, match=why.replace("-", r"\-")):
        ServeConfig.of(**{"backend": "vllm", **opts})


def test_a_vllm_that_cannot_start_is_one_line(tmp_path):
    opts = VllmOptions(python=Path(sys.executable), model_dir=tmp_path, dtype="float32", store_root=tmp_path,
                       base_fingerprint="x", max_model_len=64, max_num_seqs=1, startup_timeout_s=30,
                       command=(sys.executable, "-c", "import sys; print('no such model'); sys.exit(4)"))
    server = VllmServer(opts)
    with pytest.raises(ValueError, match=r"vLLM exited with code 4 while starting: no such model"):
        server.start()
    server.close()


def test_the_child_gets_vllms_arguments_and_a_shared_stores_dsn(tmp_path):
    opts = VllmOptions(python=Path("/v/bin/python"), model_dir=tmp_path / "m", dtype="bfloat16", store_root=tmp_path,
                       base_fingerprint="sha256:ab", max_model_len=512, max_num_seqs=8,
                       store_ref="postgresql://u@h/db?objects=/mnt/shared")
    args = VllmServer(opts).args(1234)
    assert args[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(args[3::2], args[4::2]))
    assert flags["--model"] == str(tmp_path / "m") and flags["--dtype"] == "bfloat16"
    assert (flags["--port"], flags["--max-model-len"], flags["--max-num-seqs"]) == ("1234", "512", "8")
    assert flags["--host"] == "127.0.0.1"  # vLLM is never exposed: our server is the door
    kv = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "SoftpromptConnector" and kv["kv_role"] == "kv_consumer"
    assert kv["kv_connector_extra_config"] == {"store": "postgresql://u@h/db?objects=/mnt/shared",
                                               "base_fingerprint": "sha256:ab", "dtype": "bfloat16"}
    assert "--enable-prefix-caching" in args


def test_a_client_that_goes_away_frees_its_row_and_vllms_request(served):
    from softprompt.serve.handle import Request

    _, engine, *_ = served
    cancelled = engine.stats["cancelled"]
    handle = engine.submit(Request(prompt="ka mo", task="alpha", max_new_tokens=40, seed=300))  # 0.2 s a token
    events = iter(handle)
    next(events)  # the first token is out: the request runs in vLLM
    handle.cancel()
    result = handle.result(timeout=10)
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 40
    assert engine.stats["cancelled"] == cancelled + 1
    deadline = time.monotonic() + 5
    while engine.status()["running_rows"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
