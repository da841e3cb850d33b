"""Issue 13: no request, card or command stops the server or loses an artifact. Each test is one
reproduction from the issue (the numbers in the comments are its items), run against the real
`serve` path (build_app over a store) or the real CLI, on a tiny model."""

import json
import socket
import threading

import httpx
import pytest
import uvicorn
from conftest import tiny_model
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.cli import main
from softprompt.io.artifact import ArtifactError, save_artifact
from softprompt.io.load import load_base
from softprompt.serve import Engine, Request, TaskRegistry
from softprompt.store.core import Store

KEY = "sk-hardening"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}ba{% endif %}"


class Live:
    """uvicorn in a thread on a socket bound before it starts: a request sent at once waits in the
    listen backlog until the server accepts it, so nobody polls for readiness."""

    def __init__(self, app):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("b") / "tiny-base"  # served as model "tiny-base"
    tiny_model("llama").save_pretrained(d)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def live(base_dir, tmp_path_factory):
    """`softprompt serve`'s app over a store holding task `pfx` and an API key file."""
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.main import build_app

    root = tmp_path_factory.mktemp("live")
    model, _ = load_base(base_dir)
    store = Store(root / "store")
    store.add("pfx", methods.create("prefix_tuning", model, num_virtual_tokens=3, projection_dim=0, seed=1), model)
    (root / "keys").write_text(f"# keys\n  # an indented comment is no key\n{KEY}\n")
    app, config = build_app(ServeConfig.of(store=str(root / "store"), base=str(base_dir),
                                            api_keys_file=str(root / "keys"), max_body_bytes=4096))
    with Live(app) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            yield c, app, store, root
        assert generates(c), "after the tests the server under test still generates"


def generates(c, model="tiny-base") -> bool:
    with httpx.Client(base_url=str(c.base_url), headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as fresh:
        r = fresh.post("/v1/completions", json={"model": model, "prompt": "ba be", "max_tokens": 2, "temperature": 0})
    return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def raw(c, body: str, path="/v1/completions", **headers):
    """POST a body exactly as written (JSON escapes such as a lone surrogate survive)."""
    return c.post(path, content=body.encode(), headers={"content-type": "application/json", **headers})


# ---- 1. one ordinary request stops generation for good -----------------------------------------------

def test_tiny_temperature_is_greedy_and_the_engine_lives_on(live):
    c, *_ = live
    ask = {"model": "pfx", "prompt": "ba be bi", "max_tokens": 4}
    greedy = c.post("/v1/completions", json=ask | {"temperature": 0}).json()["choices"][0]["text"]
    for t in (1e-40, 5e-324, 1e-5):
        r = c.post("/v1/completions", json=ask | {"temperature": t})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (t, r.text)
    assert generates(c)


@pytest.mark.parametrize("body", [
    '{"model": "tiny-base", "prompt": "Hi\\ud800", "max_tokens": 3}',
    '{"model": "pfx", "prompt": ["ba", "\\udfff ba"], "max_tokens": 3}',
    '{"model": "tiny-base", "prompt": "ba\\ud800", "max_tokens": 3, "stream": true}',
    '{"model": "tiny-base", "messages": [{"role": "user", "content": "x\\ud83d"}], "max_tokens": 3}',
])
def test_text_the_tokenizer_cannot_encode_is_a_400_and_the_engine_lives_on(live, body):
    c, *_ = live
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = raw(c, body, path)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_text", r.text
    assert generates(c)


def test_a_failure_in_one_row_ends_that_row_only(monkeypatch):
    """A row whose sampling raises ends with an error; the rows decoded with it finish as if alone."""
    import softprompt.serve.base as base

    model, tok = tiny_model("llama"), tiny_tokenizer()
    alone = Engine(model, tok).generate([Request(prompt="ba be", max_new_tokens=5),
                                         Request(prompt="di do du", max_new_tokens=5)])
    real = base.pick_next

    def pick_next(logits, params, gen):
        if params.top_k == 7:  # the poisoned request
            raise RuntimeError("boom")
        return real(logits, params, gen)

    monkeypatch.setattr(base, "pick_next", pick_next)
    engine = Engine(model, tok)
    out = engine.generate([Request(prompt="ba be", max_new_tokens=5),
                           Request(prompt="ga ge", max_new_tokens=5, temperature=1.0, top_k=7),
                           Request(prompt="di do du", max_new_tokens=5)])
    assert out[1].finish_reason == "error" and out[1].error_code == "internal_error" and "boom" in out[1].error
    assert [o.token_ids for o in (out[0], out[2])] == [a.token_ids for a in alone]
    assert engine.generate([Request(prompt="ba", max_new_tokens=2)])[0].finish_reason == "length"


def test_a_task_whose_loader_raises_ends_that_request_only(monkeypatch):
    """Not only RequestError: any exception preparing a request (here a loader's ValueError) is that
    request's error, in the same step as requests that succeed."""
    model, tok = tiny_model("llama"), tiny_tokenizer()

    class Broken:
        def open(self, model):
            raise ValueError("invalid literal for int() with base 10: 'abc'")

    engine = Engine(model, tok, {"bad": Broken()})
    bad, good = engine.generate([Request(prompt="ba", task="bad", max_new_tokens=2),
                                 Request(prompt="ba", max_new_tokens=2)])
    assert bad.finish_reason == "error" and "abc" in bad.error
    assert good.finish_reason == "length" and len(good.token_ids) == 2


def test_a_failed_decode_pass_ends_the_running_rows_and_the_loop_goes_on(monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    engine = Engine(model, tok)
    real, calls = engine._decode, []

    def decode():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a kernel failed")
        return real()

    monkeypatch.setattr(engine, "_decode", decode)
    engine.start()
    try:
        first = engine.submit(Request(prompt="ba be", max_new_tokens=4)).result(timeout=30)
        assert first.finish_reason == "error" and "a kernel failed" in first.error
        after = engine.submit(Request(prompt="ba be", max_new_tokens=4)).result(timeout=30)
        assert after.finish_reason in ("length", "stop") and after.token_ids and engine.stats["faults"] == 1
        assert engine.running
    finally:
        engine.stop()


class _Die(BaseException):
    """What no `except Exception` catches: it ends the loop's thread."""


def test_a_dead_loop_is_restarted_and_health_is_503_while_nothing_can_generate(tmp_path):
    from softprompt.serve.http import ServerConfig, create_app

    model, tok = tiny_model("llama"), tiny_tokenizer()
    engine = Engine(model, tok)
    app = create_app(engine, config=ServerConfig(base_model_id="b"))
    died = threading.Event()
    real = engine.step

    def step():
        if not died.is_set():
            died.set()
            raise _Die()
        return real()

    engine.step = step
    hook, threading.excepthook = threading.excepthook, lambda args: None  # the thread's death is expected
    try:
        with Live(app) as url:
            died.wait(30)
            engine._thread.join(30)
            assert not engine.running  # the loop is dead ...
            r = httpx.post(url + "/v1/completions", json={"model": "b", "prompt": "ba", "max_tokens": 2}, timeout=30)
            assert r.status_code == 200, r.text  # ... and the next request restarted it
            h = httpx.get(url + "/health")
            assert h.status_code == 200 and h.json()["restarts"] == 1
            engine.stop()  # nothing can generate now: a load balancer must take the node out
            h = httpx.get(url + "/health")
            assert h.status_code == 503 and h.json()["status"] == "stopped"
    finally:
        threading.excepthook = hook


# ---- 2. a bad card in the store kills the engine on first use ---------------------------------------

def _artifact_with(tmp_path, model, **fields):
    art = save_artifact(methods.create("prompt_tuning", model, num_virtual_tokens=2, init="random"),
                        tmp_path / "art", model)
    card = json.loads((art / "card.json").read_text())
    card.update(fields)
    (art / "card.json").write_text(json.dumps(card))
    return art


@pytest.mark.parametrize("field,value", [("num_virtual_tokens", "abc"), ("config", "x"), ("metrics", "x"),
                                         ("base_model", "x"), ("num_virtual_tokens", [20]), ("tensors", [1]),
                                         ("method", ["prompt_tuning"]), ("plot", 3)])
def test_store_add_refuses_a_bad_card_in_one_line_naming_the_field(tmp_path, field, value, capsys):
    model = tiny_model("llama")
    art = _artifact_with(tmp_path, model, **{field: value})
    store = Store(tmp_path / "store")
    with pytest.raises(ArtifactError, match=field) as e:
        store.add("t", art)
    assert "\n" not in str(e.value) and store.ls() == []
    assert main(["store", "add", "t", str(art), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and "Traceback" not in err


def test_a_bad_card_served_by_path_is_a_400_for_its_requests_only(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    art = _artifact_with(tmp_path, model, num_virtual_tokens="abc")
    engine = Engine(model, tok, {"bad": str(art)})
    bad, good = engine.generate([Request(prompt="ba", task="bad", max_new_tokens=2),
                                 Request(prompt="ba", max_new_tokens=2)])
    assert bad.error_code == "task_refused" and "num_virtual_tokens" in bad.error
    assert good.finish_reason == "length"


# ---- 3. init overwrites; huge P allocates until the kernel kills it -----------------------------------

def test_init_refuses_an_existing_artifact_unless_overwrite(base_dir, tmp_path, capsys):
    art = tmp_path / "a"
    assert main(["init", str(art), "--base", str(base_dir), "--method", "prefix", "--num-virtual-tokens", "3",
                 "--projection-dim", "0"]) == 0
    before = (art / "adapter.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["init", str(art), "--base", str(base_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert (art / "adapter.safetensors").read_bytes() == before
    assert main(["init", str(art), "--base", str(base_dir), "--overwrite"]) == 0
    assert json.loads((art / "card.json").read_text())["method"] == "prompt_tuning"


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_init_bounds_num_virtual_tokens_before_allocating(base_dir, tmp_path, capsys, method):
    before = set(tmp_path.iterdir())
    assert main(["init", str(tmp_path / "big"), "--base", str(base_dir), "--method", method,
                 "--num-virtual-tokens", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "context of 256" in err and "use at most 255" in err
    assert set(tmp_path.iterdir()) == before  # nothing written, no temporary directory left


def test_size_check_counts_memory(monkeypatch):
    monkeypatch.setattr(methods, "available_bytes", lambda: 10 * 2**20)  # 10 MiB free
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="free memory"):
        methods.create("prefix_tuning", model, num_virtual_tokens=255, projection_dim=8192)
    methods.create("prefix_tuning", model, num_virtual_tokens=4, projection_dim=8)


def test_export_peft_store_export_and_train_refuse_an_existing_destination(base_dir, tmp_path, capsys):
    art = tmp_path / "a.safetensors"
    assert main(["init", str(art), "--base", str(base_dir)]) == 0
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    assert main(["export-peft", str(art), str(tmp_path / "peft"), "--base", str(base_dir)]) == 2
    assert (tmp_path / "peft" / "adapter_config.json").read_text() == "{}"
    assert main(["export-peft", str(art), str(tmp_path / "peft"), "--base", str(base_dir), "--overwrite"]) == 0
    s = ["--store", str(tmp_path / "store")]
    assert main(["store", "add", "t", str(art)] + s) == 0
    (tmp_path / "out.safetensors").write_bytes(b"mine")
    assert main(["store", "export", "t", str(tmp_path / "out.safetensors")] + s) == 2
    assert (tmp_path / "out.safetensors").read_bytes() == b"mine"
    assert main(["store", "export", "t", str(tmp_path / "out.safetensors"), "--overwrite"] + s) == 0
    assert (tmp_path / "out.safetensors").read_bytes() == art.read_bytes()
    run = tmp_path / "run"
    run.mkdir()
    (run / "best").mkdir()
    assert main(["train", str(tmp_path / "d.jsonl"), str(run), "--base", str(base_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 6 and "--overwrite" in err.splitlines()[-1] and (run / "best").is_dir()


# ---- 4. a card can make the server read any file -------------------------------------------------------

def test_card_paths_outside_the_store_are_never_read(live, tmp_path, monkeypatch):
    c, app, store, root = live
    model = app.state.engine.model
    secret = tmp_path / "secret.json"
    secret.write_text('{"password": "hunter2"}')
    png = tmp_path / "elsewhere.png"
    png.write_bytes(b"\x89PNG secret")
    art = _artifact_with(tmp_path, model, inspection=str(secret), plot=str(png))
    store.add("leaky", art)
    assert "inspection" not in store.show("leaky")["card"]  # not copied in: it is not beside the artifact
    for what in ("inspection", "plot"):
        r = c.get(f"/v1/tasks/leaky/{what}")
        assert r.status_code == 404 and "hunter2" not in r.text and "secret" not in r.text, r.text
    # a card that names such a path anyway (written into the store by other means) is not followed either
    engine_side = app.state.engine  # registered by path, for this test only (the app is shared)
    monkeypatch.setattr(engine_side, "tasks", TaskRegistry({"byhand": str(art)}, fallback=engine_side.tasks.resolve))
    for what in ("inspection", "plot"):
        r = c.get(f"/v1/tasks/byhand/{what}")
        assert r.status_code == 404 and "hunter2" not in r.text, r.text


def test_a_training_runs_plot_is_copied_into_the_store_and_served(live, tmp_path):
    c, app, store, _ = live
    model = app.state.engine.model
    run = tmp_path / "run"
    art = save_artifact(methods.create("prompt_tuning", model, num_virtual_tokens=2, init="random"), run / "best",
                        model, extra={"plot": str((run / "plot.png").resolve())})
    (run / "plot.png").write_bytes(b"\x89PNG plot")
    store.add("trained", art)
    assert store.show("trained")["card"]["plot"].startswith("files/")
    (run / "plot.png").unlink()  # the store keeps its own copy
    r = c.get("/v1/tasks/trained/plot")
    assert r.status_code == 200 and r.content == b"\x89PNG plot"


# ---- 5. 500s and tracebacks ----------------------------------------------------------------------------

def test_huge_version_numbers_are_404_not_500(live):
    c, *_ = live
    for path in ("card", "plot", "inspection"):
        r = c.get(f"/v1/tasks/pfx@9223372036854775808/{path}")
        assert r.status_code == 404 and "error" in r.json(), r.text
    r = c.post("/v1/completions", json={"model": "pfx@99999999999999999999999", "prompt": "ba"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_cli_failures_are_one_line_and_exit_2(base_dir, tmp_path, capsys):
    s = ["--store", str(tmp_path / "store")]
    assert main(["init", str(tmp_path / "a.safetensors"), "--base", str(base_dir)]) == 0
    assert main(["store", "add", "pfx", str(tmp_path / "a.safetensors")] + s) == 0
    capsys.readouterr()
    not_a_store = tmp_path / "passwd"
    not_a_store.write_text("root:x:0:0\n")
    for argv in (["store", "show", "pfx@99999999999999999999999"] + s,
                 ["store", "ls", "--store", str(not_a_store)],
                 ["store", "ls", "--store", "/etc/passwd"],
                 ["init", "/proc/foo", "--base", str(base_dir)],
                 ["serve", "--port", "99999"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("softprompt ") and "Traceback" not in err, (argv, err)
    obj = Store(tmp_path / "store").resolve("pfx")
    obj.unlink()
    assert main(["store", "export", "pfx", str(tmp_path / "out")] + s) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read" in err and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_serve_on_a_busy_port_fails_before_its_banner(capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--store", "/nonexistent-never-opened"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen" in err and "serving" not in err


# ---- 6. auth and protocol edges -------------------------------------------------------------------------

def test_auth_scheme_is_case_insensitive_401_carries_www_authenticate_and_comes_before_the_body(live):
    c, *_ = live
    url = str(c.base_url)
    ok = httpx.post(url + "/v1/completions", json={"model": "tiny-base", "prompt": "ba", "max_tokens": 1},
                    headers={"Authorization": f"bearer {KEY}"})
    assert ok.status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "# an indented comment is no key"},
                    {"Authorization": "Bearer # an indented comment is no key"}, {"Authorization": KEY}):
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-base", "temperature": "not a number"},
                       headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error" and "temperature" not in r.text


def test_keys_are_compared_in_constant_time_and_key_files_parsed_strictly(tmp_path, monkeypatch):
    import hmac

    from softprompt.serve import guard
    from softprompt.serve.main import read_api_keys

    f = tmp_path / "keys"
    f.write_text("# comment\n   # indented comment\n\n  sk-one  \nsk-two\n")
    assert read_api_keys(str(f)) == {"sk-one", "sk-two"}
    f.write_text("sk-one\nsk two words\n")
    with pytest.raises(ValueError, match="line 2"):
        read_api_keys(str(f))
    seen, real = [], hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: seen.append(b) or real(a, b))
    assert guard.key_matches("sk-one", ["sk-one", "sk-two", "sk-three"]) and len(seen) == 3  # no early exit


def test_oversized_bodies_are_413_also_when_chunked(live):
    c, *_ = live

    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert generates(c)


def test_a_half_sent_body_is_timed_out_with_408():
    from softprompt.serve.http import ServerConfig, create_app

    engine = Engine(tiny_model("llama"), tiny_tokenizer())
    with Live(create_app(engine, config=ServerConfig(base_model_id="b", body_timeout_s=0.3))) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\"")  # 8 of the 100 bytes, then nothing
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert httpx.post(url + "/v1/completions", json={"model": "b", "prompt": "ba", "max_tokens": 1}).status_code == 200


def test_unknown_routes_wrong_methods_and_bad_bodies_are_openai_shaped(live):
    c, *_ = live
    for r, status in ((c.get("/v1/nope"), 404), (c.get("/v1/completions"), 405),
                      (raw(c, "{not json"), 400), (raw(c, '{"model": "pfx", "prompt": "ba", "max_tokens": true}'), 400),
                      (raw(c, '{"model": "pfx", "prompt": "ba", "n": 1.0}'), 400),
                      (raw(c, '{"model": "pfx", "prompt": "ba", "stream": 1}'), 400)):
        body = r.json()
        assert r.status_code == status and set(body) == {"error"}, r.text
        assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,code", [({"prompt": ""}, "bad_request"),
                                       ({"prompt": "ba", "max_tokens": 3000}, "bad_request"),
                                       ({"prompt": "ba " * 200, "max_tokens": 100}, "prompt_too_long")])
def test_errors_known_before_a_stream_starts_are_real_http_errors(live, body, code):
    c, *_ = live
    r = c.post("/v1/completions", json={"model": "pfx", "stream": True} | body)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["error"]["code"] == code


# ---- 7. a deleted artifact keeps being served from the prefix cache ------------------------------------

def test_a_task_whose_file_was_deleted_is_refused_not_served_from_the_cache(live):
    c, app, store, _ = live
    model = app.state.engine.model
    store.add("gone", methods.create("prompt_tuning", model, num_virtual_tokens=2, init="random", seed=5), model)
    assert generates(c, "gone")  # compiled and cached
    store.resolve("gone").unlink()
    assert store.show("gone")["file_ok"] is False
    r = c.post("/v1/completions", json={"model": "gone", "prompt": "ba", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "task_refused" and "missing" in r.text
    assert generates(c, "pfx")
