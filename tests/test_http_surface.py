"""The HTTP surface as OpenAI and vLLM clients expect it: `GET /v1/models/{id}` (also for ids with
'/' and '@'), vLLM's `max_model_len` / `root` / `parent` (and `max_model_len` is the very limit a
request meets), 400 for bad parameters with `param` naming the field, `/docs` and `/redoc` served
with no network, and the access log (one line per request, a key's name but never a key or a prompt)."""

import calendar
import logging
import re
import time

import openai
import pytest
from conftest import tiny_model
from starlette.testclient import TestClient
from test_http import CHAT_TEMPLATE, Server
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.serve import Engine
from softprompt.serve.access import LOGGER, key_id
from softprompt.serve.http import ServerConfig, create_app

BASE_ID = "HuggingFaceTB/SmolLM2-tiny"  # a hub-style id: the '/' must survive routing
CONTEXT = 256  # the tiny llama's max_position_embeddings
ALICE, BOB = "sk-alice-0123456789", "sk-bob-9876543210"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`softprompt serve`'s app (build_app) over a store holding alpha@1 (P=3) and alpha@2 (P=5),
    a task held in memory (P=2), and a keys file naming one of its two keys."""
    from softprompt.io.load import load_base
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.main import build_app
    from softprompt.store.core import Store

    root = tmp_path_factory.mktemp("surface")
    tiny_model("llama").save_pretrained(root / "base")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root / "base")
    model, _ = load_base(root / "base")
    store = Store(root / "store")
    store.add("alpha", methods.create("prefix_tuning", model, num_virtual_tokens=3, projection_dim=0, seed=1), model)
    store.add("alpha", methods.create("prompt_tuning", model, num_virtual_tokens=5, seed=2), model)
    (root / "keys").write_text(f"# clients\n{ALICE}   # alice\n{BOB}\n")
    mem = methods.create("p_tuning", model, num_virtual_tokens=2, seed=3)
    app, config = build_app(ServeConfig.of(store=str(root / "store"), base=str(root / "base"),
                                           api_keys_file=str(root / "keys"), served_model_name=BASE_ID),
                            tasks={"mem": mem})
    return app, config, root


def test_models_retrieve_gives_each_entry_of_the_list_and_404_for_unknown_ids(served):
    from softprompt.store.core import Store

    app, _, root = served
    with Server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
        listed = {m.id: m.model_dump() for m in client.models.list().data}
        assert list(listed) == [BASE_ID, "mem", "alpha"]
        for model_id, entry in listed.items():  # the client sends BASE_ID's '/' as %2F
            assert client.models.retrieve(model_id).model_dump() == entry
        # vLLM's fields: the context less the task's virtual tokens; root the base, parent the base for a task
        assert {i: (e["max_model_len"], e["root"], e["parent"]) for i, e in listed.items()} == {
            BASE_ID: (CONTEXT, BASE_ID, None), "mem": (CONTEXT - 2, BASE_ID, BASE_ID),
            "alpha": (CONTEXT - 5, BASE_ID, BASE_ID)}
        assert all(e["object"] == "model" and e["owned_by"] == "softprompt" for e in listed.values())
        # created: the base's files (the same on every replica), a store task's addition to the store
        assert listed[BASE_ID]["created"] == int((root / "base" / "config.json").stat().st_mtime)
        added = {r["version"]: r["created"] for r in Store(root / "store").ls(all_versions=True)}
        assert listed["alpha"]["created"] == calendar.timegm(time.strptime(added[2], "%Y-%m-%dT%H:%M:%SZ"))
        v1 = client.models.retrieve("alpha@1")
        assert (v1.id, v1.max_model_len, v1.parent) == ("alpha@1", CONTEXT - 3, BASE_ID)
        assert client.models.retrieve("alpha@2").model_dump() == {**listed["alpha"], "id": "alpha@2"}
        for unknown in ("nope", "alpha@9", "HuggingFaceTB", "mem/x"):
            with pytest.raises(openai.NotFoundError) as e:
                client.models.retrieve(unknown)
            assert e.value.code == "model_not_found" and e.value.param == "model", unknown
    c = TestClient(app, headers={"Authorization": f"Bearer {ALICE}"})
    raw = {e["id"]: e for e in c.get("/v1/models").json()["data"]}
    assert c.get(f"/v1/models/{BASE_ID}").json() == raw[BASE_ID]  # an unescaped '/' too
    assert set(raw["alpha"]) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len"}
    assert c.get("/v1/models/alpha").status_code == 200
    assert TestClient(app).get("/v1/models/alpha").status_code == 401  # behind the API keys, as the list


@pytest.mark.parametrize("model_id,P", [(BASE_ID, 0), ("alpha@1", 3), ("alpha", 5), ("mem", 2)])
def test_max_model_len_is_the_limit_a_request_meets(served, model_id, P):
    """Prompt + completion up to max_model_len is served; one token more is refused (400)."""
    app, *_ = served
    with TestClient(app, headers={"Authorization": f"Bearer {ALICE}"}) as c:  # `with`: the engine runs
        limit = c.get(f"/v1/models/{model_id}").json()["max_model_len"]
        ask = {"model": model_id, "max_tokens": 2, "temperature": 0}
        fits = c.post("/v1/completions", json=ask | {"prompt": [5] * (limit - 2)})
        over = c.post("/v1/completions", json=ask | {"prompt": [5] * (limit - 1)})
    assert limit == CONTEXT - P
    assert fits.status_code == 200 and fits.json()["usage"]["prompt_tokens"] == limit - 2, fits.text
    assert over.status_code == 400 and over.json()["error"]["code"] == "prompt_too_long", over.text


def test_bad_parameters_are_400_in_openai_shape_naming_the_field(served):
    app, *_ = served
    with Server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:  # FastAPI's 422 was an UnprocessableEntityError
            client.completions.create(model="alpha", prompt="ba", max_tokens=100000)
        assert e.value.status_code == 400 and e.value.code == "invalid_parameter" and e.value.param == "max_tokens"
        assert "4096" in e.value.message  # the limit
    c = TestClient(app, headers={"Authorization": f"Bearer {ALICE}"})
    for path, body, param in (
            ("/v1/completions", {"model": "alpha", "prompt": "ba", "temperature": "hot"}, "temperature"),
            ("/v1/completions", {"prompt": "ba"}, "model"),
            ("/v1/completions", {"model": "alpha", "prompt": "ba", "n": 1.0}, "n"),
            ("/v1/chat/completions", {"model": BASE_ID, "messages": [{"role": "robot", "content": "hi"}]},
             "messages.0.role"),
            ("/v1/completions", ["not", "an", "object"], None)):
        r = c.post(path, json=body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and err["code"] == "invalid_parameter", r.text
        assert err["type"] == "invalid_request_error" and err["message"]


def test_docs_and_redoc_load_every_script_and_style_from_the_server_itself():
    app = create_app(Engine(tiny_model("llama"), tiny_tokenizer()))
    c = TestClient(app)
    for page in ("/docs", "/redoc"):
        r = c.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert any(u.endswith(".js") for u in urls), (page, urls)
        assert not [u for u in urls if "//" in u], (page, urls)  # nothing from another host
        for u in urls:
            asset = c.get(u)
            assert asset.status_code == 200 and len(asset.content) > 1000, (page, u, asset.status_code)
            if u.endswith(".js"):
                assert "javascript" in asset.headers["content-type"]
            if u.endswith(".css"):
                assert asset.headers["content-type"].startswith("text/css")
    assert c.get("/openapi.json").json()["paths"]["/v1/models/{model}"]["get"]
    assert "validatorUrl" in c.get("/docs").text  # Swagger UI's validator badge (a third-party call) is off


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    return lambda: [r for r in caplog.records if r.name == LOGGER]


def test_access_log_has_one_line_per_request_with_the_keys_name_and_no_secret(served, access):
    app, config, _ = served
    assert config.api_key_names == ((key_id(ALICE), "alice"),)  # fingerprints and names: no key in the config
    ask = {"model": "alpha", "prompt": "ba be bi zu-prompt-text", "max_tokens": 2}
    with TestClient(app) as c:  # `with`: the engine runs (the app's lifespan)
        r1 = c.post("/v1/completions?user=q-secret", json=ask, headers={"Authorization": f"Bearer {ALICE}"})
        r2 = c.post("/v1/completions", json=ask | {"stream": True},
                    headers={"Authorization": f"Bearer {BOB}", "X-Request-Id": "client-id-42"})
        r3 = c.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-key"})
        r4 = c.get("/health", headers={"X-Request-Id": "two\nlines"})
        r5 = c.post("/v1/completions", json={"model": "alpha", "prompt": "ba", "max_tokens": 100000},
                    headers={"Authorization": f"Bearer {ALICE}"})
    rs = (r1, r2, r3, r4, r5)
    assert [r.status_code for r in rs] == [200, 200, 401, 200, 400]
    recs = access()
    assert len(recs) == 5, [r.getMessage() for r in recs]
    assert [(x.method, x.path, x.status, x.key) for x in recs] == [
        ("POST", "/v1/completions", 200, "alice"), ("POST", "/v1/completions", 200, key_id(BOB)),
        ("GET", "/v1/models", 401, "invalid"), ("GET", "/health", 200, "-"), ("POST", "/v1/completions", 400, "alice")]
    # the id the answer carries is the logged one; a client's plain id is kept, a forged one replaced
    assert [x.request_id for x in recs] == [r.headers["x-request-id"] for r in rs]
    assert recs[1].request_id == "client-id-42" and re.fullmatch(r"[0-9a-f]{16}", recs[3].request_id)
    assert all(x.duration_ms > 0 for x in recs)
    text = "\n".join(x.getMessage() for x in recs)
    assert text.count("\n") == 4 and 'POST /v1/completions" 200' in text and "key=alice" in text
    for secret in (ALICE, BOB, "sk-wrong-key", "zu-prompt-text", "q-secret"):
        assert secret not in text


def test_no_access_log_keeps_the_request_id_and_logs_nothing(access):
    app = create_app(Engine(tiny_model("llama"), tiny_tokenizer()), config=ServerConfig(access_log=False))
    with TestClient(app) as c:
        r = c.get("/health")
    assert r.status_code == 200 and re.fullmatch(r"[0-9a-f]{16}", r.headers["x-request-id"])
    assert access() == []


def test_the_cli_turns_our_access_log_on_and_uvicorns_off(monkeypatch):
    """`softprompt serve` prints our line on stderr and tells uvicorn not to print its own;
    `--no-access-log` turns ours off."""
    import uvicorn

    from softprompt.cli import parse_config_command
    from softprompt.serve import main

    assert parse_config_command("serve", []).server.access_log is True
    assert parse_config_command("serve", ["--no-access-log"]).server.access_log is False
    seen = {}

    class FakeServer:
        def __init__(self, config):
            seen["access_log"] = config.access_log

        def run(self, sockets):
            seen["ran"] = True

    app = create_app(Engine(tiny_model("llama"), tiny_tokenizer()))
    monkeypatch.setattr(main, "build_app", lambda cfg: (app, ServerConfig(access_log=cfg.server.access_log)))
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    log = logging.getLogger(LOGGER)
    saved = (list(log.handlers), log.level, log.propagate)
    try:
        main.serve(parse_config_command("serve", ["--port", "0", "--threads", "1"]))
        assert seen == {"access_log": False, "ran": True}
        ours = [h for h in log.handlers if getattr(h, "softprompt_access", False)]
        assert len(ours) == 1 and log.level == logging.INFO
    finally:  # the handler prints to stderr and stops propagation: take it away for the other tests
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
        log.propagate = saved[2]
