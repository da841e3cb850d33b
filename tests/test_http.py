"""The HTTP server: the official openai client talks to it (completions, chat, streaming, models)
and gets the engine's tokens; bad input gets OpenAI-shaped errors with the right status; a client
that disconnects frees its row; schemathesis finds no 5xx."""

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import tiny_model
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.serve import Engine, Request
from softprompt.serve.http import ServerConfig, create_app

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}ba{% endif %}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def make_tasks(model, n):
    tasks = {}
    for i in range(n):
        method = ["prefix_tuning", "prompt_tuning", "p_tuning"][i % 3]
        opts = dict(projection_dim=0) if method == "prefix_tuning" else {}
        prompt = methods.create(method, model, num_virtual_tokens=2 + i % 5, seed=i, **opts)
        with torch.no_grad():
            for p in prompt.parameters():
                p.normal_(0, 0.5)
        tasks[f"task{i}"] = prompt
    return tasks


@pytest.fixture(scope="module")
def stack():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tasks = make_tasks(model, 4)
    engine = Engine(model, tok, dict(tasks), max_batch_size=8)
    app = create_app(engine, config=ServerConfig(base_model_id="tiny-base", max_body_bytes=4096,
                                                 api_keys=frozenset({"sk-test"})))
    with Server(app) as url:
        yield url, engine, model, tok, tasks


def alone(model, tok, task_prompt, text, n):
    """Greedy tokens of a request run by itself, in a fresh engine."""
    eng = Engine(model, tok, {"t": task_prompt} if task_prompt is not None else {})
    return eng.generate([Request(prompt=text, task="t" if task_prompt is not None else None, max_new_tokens=n)])[0]


def test_openai_client_completions_chat_streaming_models(stack):
    url, engine, model, tok, tasks = stack
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny-base" and set(tasks) <= set(ids)

    ref = alone(model, tok, tasks["task1"], "ba be bi bo", 6)
    out = client.completions.create(model="task1", prompt="ba be bi bo", max_tokens=6, temperature=0)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.completion_tokens == len(ref.token_ids) and out.usage.prompt_tokens == 4

    streamed = client.completions.create(model="task1", prompt="ba be bi bo", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref.text

    chat_prompt = tok.apply_chat_template([{"role": "user", "content": "ka ke"}], tokenize=False,
                                          add_generation_prompt=True)
    ref_chat = alone(model, tok, None, chat_prompt, 5)
    msg = [{"role": "user", "content": "ka ke"}]
    chat = client.chat.completions.create(model="tiny-base", messages=msg, max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == ref_chat.text and chat.choices[0].message.role == "assistant"
    chunks = client.chat.completions.create(model="tiny-base", messages=msg, max_tokens=5, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref_chat.text

    many = client.completions.create(model="task2", prompt=["ba be", "da de di"], max_tokens=4, temperature=0.8,
                                     seed=3, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="task2", prompt=["ba be", "da de di"], max_tokens=4, temperature=0.8,
                                      seed=3, n=2)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeded sampling is reproducible


def test_errors_have_openai_shape_and_status(stack):
    url, engine, *_ = stack
    auth = {"Authorization": "Bearer sk-test"}
    with httpx.Client(base_url=url, headers=auth) as c:
        r = c.post("/v1/completions", json={"model": "nope", "prompt": "ba"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = c.post("/v1/completions", json={"model": "task0", "prompt": "ba", "temperature": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = c.post("/v1/completions", json={"model": "task0", "prompt": "ba " * 3000})
        assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "task0", "prompt": "ba " * 300, "max_tokens": 100})
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
        for stream in (False, True):  # token ids outside the vocabulary, echoed: refused before any decode
            r = c.post("/v1/completions", json={"model": "task0", "prompt": [-1], "echo": True, "stream": stream})
            assert r.status_code == 400 and "token ids in [0," in r.json()["error"]["message"]
        assert c.get("/health").json()["status"] == "ok"
    r = httpx.post(url + "/v1/completions", json={"model": "task0", "prompt": "ba"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


class HeldRow:
    """Holds an engine's one request mid-flight, with events rather than sleeps: the server's `submit`
    returns (and so its timeout starts) only once the row is decoding, and the engine then takes no
    further step until the server cancels the handle. Afterwards `freed()` stops the engine (joining
    its loop, so the step that handled the cancel has ended) and gives (completion, status)."""

    def __init__(self, engine):
        self.engine, self.handles = engine, []
        self.decoding, self.cancelled = threading.Event(), threading.Event()
        step, submit = engine.step, engine.submit

        def held_step():
            if self.decoding.is_set():
                self.cancelled.wait(20)
            busy = step()
            if engine.status()["running_rows"]:
                self.decoding.set()
            return busy

        def held_submit(req):
            h = submit(req)
            cancel = h.cancel
            h.cancel = lambda: (cancel(), self.cancelled.set())
            self.handles.append(h)
            assert self.decoding.wait(20), "the row never started decoding"
            return h

        engine.step, engine.submit = held_step, held_submit

    def freed(self):
        assert self.cancelled.wait(20), "the server never cancelled the request"
        (h,) = self.handles
        done = h.result(timeout=20)
        self.engine.stop()
        return done, self.engine.status()


def test_queue_full_is_429_with_retry_after_and_timeout_is_504():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    full = Engine(model, tok, max_queue=0)
    with Server(create_app(full, config=ServerConfig(base_model_id="b"))) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "b", "prompt": "ba"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    slow = Engine(model, tok)
    held = HeldRow(slow)  # the row cannot finish before the 1 ms timeout, however fast the machine
    with Server(create_app(slow, config=ServerConfig(base_model_id="b", request_timeout_s=0.001))) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "b", "prompt": "ba", "max_tokens": 200})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        done, status = held.freed()
    assert done.finish_reason == "cancelled" and len(done.token_ids) == 1  # freed mid-flight, after 1 token
    assert status["running_rows"] == 0 and status["waiting"] == 0 and status["cancelled"] == 1


def test_non_streaming_client_disconnect_frees_its_row():
    """A client that closes its connection while a (non-streaming) completion decodes: its row is freed."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    engine = Engine(model, tok)
    held = HeldRow(engine)
    with Server(create_app(engine, config=ServerConfig(base_model_id="b"))) as url:
        body = json.dumps({"model": "b", "prompt": "ba be", "max_tokens": 200}).encode()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert held.decoding.wait(20)
        # the connection is closed: the server notices and cancels
        done, status = held.freed()
    assert done.finish_reason == "cancelled" and len(done.token_ids) == 1
    assert status["running_rows"] == 0 and status["waiting"] == 0 and status["cancelled"] == 1


def test_client_disconnect_frees_its_row(stack):
    url, engine, *_ = stack
    before = engine.status()["cancelled"]
    with httpx.Client(base_url=url, headers={"Authorization": "Bearer sk-test"}) as c:
        with c.stream("POST", "/v1/completions", json={"model": "task3", "prompt": "ba be", "max_tokens": 240,
                                                        "temperature": 0, "stream": True}) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
    deadline = time.time() + 15
    while engine.status()["cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert engine.status()["cancelled"] == before + 1
    while engine.status()["running_rows"] and time.time() < deadline:
        time.sleep(0.05)
    assert engine.status()["running_rows"] == 0


def test_metrics_in_prometheus_format(stack):
    url, *_ = stack
    text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer sk-test"}).text
    for name in ["softprompt_requests_total", "softprompt_generated_tokens_total", "softprompt_queue_length",
                 "softprompt_running_rows", "softprompt_prefix_cache_hits_total", "softprompt_mean_batch_rows"]:
        assert f"\n{name} " in "\n" + text


def names_the_real_models(raw: dict, models: list[str], refs: list[str]) -> dict:
    """The app's OpenAPI schema with `model` (every request body) and `{ref}` (task routes) drawn
    from names that exist: with free strings nearly every generated request was a 404 and no case
    ever reached the engine. A few unknown and malformed names stay in the mix."""
    import copy

    raw = copy.deepcopy(raw)
    for comp in raw["components"]["schemas"].values():
        if "model" in comp.get("properties", {}):
            comp["properties"]["model"] = {"type": "string", "enum": models}
    for ops in raw["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] in ("ref", "model"):  # /v1/tasks/{ref}/..., /v1/models/{model}
                    param["schema"] = {"type": "string", "enum": refs}
    return raw


def test_schemathesis_finds_no_server_errors_and_the_engine_lives_through_every_case():
    """Every operation with generated requests (bodies whose `model` is a real task, so they reach
    the engine); after each case a plain generation request must still succeed. 25 examples per
    operation keep it to seconds on two slow cores."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from starlette.testclient import TestClient

    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    engine = Engine(model, tok, make_tasks(model, 2)).start()
    app = create_app(engine, config=ServerConfig(base_model_id="base", max_body_bytes=1 << 16))
    models = ["base", "task0", "task1", "task1@1", "nope", "task0@9223372036854775808"]
    schema = schemathesis.openapi.from_dict(names_the_real_models(app.openapi(), models, models))
    schema.app = app
    probe = TestClient(app)  # no `with`: the engine is already running, the app's lifespan is not needed
    failures, reached = [], []

    def alive() -> bool:
        r = probe.post("/v1/completions", json={"model": "task0", "prompt": "ba be", "max_tokens": 2, "temperature": 0})
        return r.status_code == 200 and len(r.json()["choices"]) == 1

    try:
        for op in schema.get_all_operations():
            operation = op.ok()

            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def run(case):
                response = case.call()
                if response.status_code >= 500:  # schemathesis' not_a_server_error, stated plainly
                    failures.append((case.method, case.path, response.status_code, response.text[:200]))
                if case.path.endswith("completions") and response.status_code == 200:
                    reached.append(case.path)
                if not alive():
                    failures.append((case.method, case.path, "the engine stopped generating after this case",
                                     str(case.body)[:200]))

            run()
    finally:
        engine.stop()
    assert not failures, failures[:5]
    assert reached, "no generated request reached the engine"


def test_serves_a_store_and_picks_up_new_tasks_without_restart(tmp_path, monkeypatch):
    from softprompt.io.artifact import save_artifact
    from softprompt.io.load import load_base
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.main import build_app
    from softprompt.store.core import Store

    base_dir = tmp_path / "tiny-base"
    tiny_model("llama").save_pretrained(base_dir)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base_dir)
    model, _ = load_base(base_dir)
    store = Store(tmp_path / "store")
    first = methods.create("prefix_tuning", model, num_virtual_tokens=3, projection_dim=0, seed=1)
    store.add("alpha", save_artifact(first, tmp_path / "a1.safetensors", model))
    (tmp_path / "keys").write_text("# bearer tokens\nsk-1\n")
    monkeypatch.setenv("SOFTPROMPT_API_KEYS", "sk-2")
    app, config = build_app(ServeConfig.of(store=str(tmp_path / "store"), base=str(base_dir),
                                            api_keys_file=str(tmp_path / "keys")))
    assert config.api_keys == {"sk-1", "sk-2"} and config.base_model_id == "tiny-base"
    with Server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-2", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-base", "alpha"]
        ask = dict(prompt="ba be bi", max_tokens=6, temperature=0)
        v1 = client.completions.create(model="alpha", **ask).choices[0].text
        assert v1 == alone(model, tok, first, "ba be bi", 6).text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="beta", **ask)
        second = methods.create("prompt_tuning", model, num_virtual_tokens=5, seed=2, init="random")
        store.add("alpha", save_artifact(second, tmp_path / "a2.safetensors", model))  # a new version
        store.add("beta", save_artifact(second, tmp_path / "b.safetensors", model))  # a new task
        v2 = client.completions.create(model="alpha", **ask).choices[0].text
        assert v2 == alone(model, tok, second, "ba be bi", 6).text != v1
        assert client.completions.create(model="alpha@1", **ask).choices[0].text == v1
        assert client.completions.create(model="beta", **ask).choices[0].text == v2
        assert "beta" in [m.id for m in client.models.list().data]
        path = store.resolve("beta")
        path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")  # changed behind the index's back
        client2 = openai.OpenAI(base_url=url + "/v1", api_key="sk-1", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="changed on disk behind the index"):
            # a fresh name for the same file, so the prefix cache cannot answer
            client2.completions.create(model="beta@1", **ask)
