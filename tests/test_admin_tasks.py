"""Tasks published over HTTP: upload an artifact as a new version (served at once, no restart),
list versions, retire a version or a task; behind the API key, bounded in size, and checked as
`softprompt store add` checks a file."""

import json

import pytest
from conftest import tiny_model
from starlette.testclient import TestClient
from test_http import CHAT_TEMPLATE, alone
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.io.artifact import save_artifact
from softprompt.io.load import load_base

KEY = {"Authorization": "Bearer sk-admin"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("admin")
    base = d / "tiny-base"
    tiny_model("llama").save_pretrained(base)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    model, _ = load_base(base)
    arts = {}
    for i, method in enumerate(["prefix_tuning", "prompt_tuning"]):
        opts = dict(projection_dim=0) if method == "prefix_tuning" else dict(init="random")
        prompt = methods.create(method, model, num_virtual_tokens=3 + i, seed=i, **opts)
        arts[i] = (prompt, save_artifact(prompt, d / f"a{i}.safetensors", model).read_bytes())
    return d, base, model, tok, arts


def app_for(setup, monkeypatch, keys=("sk-admin",), **options):
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.main import build_app

    d, base, *_ = setup
    monkeypatch.setenv("SOFTPROMPT_API_KEYS", ",".join(keys))
    app, _ = build_app(ServeConfig.of(store=str(d / f"store-{len(keys)}-{len(options)}"), base=str(base),
                                         **options))
    return app


def test_upload_serves_at_once_lists_versions_and_retires(setup, monkeypatch):
    d, base, model, tok, arts = setup
    ask = {"model": "news", "prompt": "ba be bi", "max_tokens": 6, "temperature": 0}
    with TestClient(app_for(setup, monkeypatch, max_body_bytes=2048)) as c:
        assert c.post("/v1/tasks/news", content=arts[0][1]).status_code == 401  # behind the key
        assert c.post("/v1/completions", json=ask, headers=KEY).status_code == 404
        r = c.post("/v1/tasks/news", content=arts[0][1], headers=KEY)  # over max_body_bytes, under the upload limit
        assert r.status_code == 201 and r.json()["version"] == 1 and r.json()["method"] == "prefix_tuning"
        v1 = c.post("/v1/completions", json=ask, headers=KEY).json()["choices"][0]["text"]
        assert v1 == alone(model, tok, arts[0][0], "ba be bi", 6).text  # served with no restart
        r = c.post("/v1/tasks/news?tags=prod,b", content=arts[1][1], headers=KEY)
        assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["tags"] == ["b", "prod"]
        v2 = c.post("/v1/completions", json=ask, headers=KEY).json()["choices"][0]["text"]
        assert v2 == alone(model, tok, arts[1][0], "ba be bi", 6).text
        listed = c.get("/v1/tasks/news/versions", headers=KEY).json()["data"]
        assert [(x["version"], x["method"]) for x in listed] == [(1, "prefix_tuning"), (2, "prompt_tuning")]
        # retire version 2: the name serves version 1 again; retire the task: 404
        r = c.delete("/v1/tasks/news@2", headers=KEY)
        assert r.status_code == 200 and r.json()["data"] == [{"name": "news", "version": 2}]
        assert c.post("/v1/completions", json=ask, headers=KEY).json()["choices"][0]["text"] == v1
        assert c.delete("/v1/tasks/news", headers=KEY).status_code == 200
        r = c.post("/v1/completions", json=ask, headers=KEY)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert c.delete("/v1/tasks/news", headers=KEY).status_code == 404
        assert c.get("/v1/tasks/news/versions", headers=KEY).status_code == 404


def test_uploads_are_checked_like_store_add_and_bounded(setup, monkeypatch):
    d, base, model, tok, arts = setup
    blob = arts[0][1]
    with TestClient(app_for(setup, monkeypatch, max_upload_bytes=len(blob) + 200)) as c:
        def err(r, status):
            assert r.status_code == status, r.text
            return r.json()["error"]

        assert "safetensors" in err(c.post("/v1/tasks/x", content=b"not an artifact", headers=KEY), 400)["message"]
        assert err(c.post("/v1/tasks/x", content=b"", headers=KEY), 400)["param"] == "body"
        assert err(c.post("/v1/tasks/-bad", content=blob, headers=KEY), 400)["param"] == "name"
        # a card that fails the schema, with a valid checksum (the tensors are untouched)
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n])
        card = json.loads(header["__metadata__"]["softprompt_card"])
        card["num_virtual_tokens"] = "three"
        header["__metadata__"]["softprompt_card"] = json.dumps(card)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        bad = len(h).to_bytes(8, "little") + h + blob[8 + n:]
        e = err(c.post("/v1/tasks/x", content=bad, headers=KEY), 400)
        assert e["code"] == "invalid_artifact" and "num_virtual_tokens" in e["message"], e
        too_big = blob + b"\0" * 512
        assert err(c.post("/v1/tasks/x", content=too_big, headers=KEY), 413)["code"] == "body_too_large"
        assert c.get("/v1/tasks/x/versions", headers=KEY).status_code == 404  # nothing was added
        assert c.post("/v1/tasks/x", content=blob, headers=KEY).status_code == 201
        # the same bytes again: a conflict naming the version that holds them, unless asked for
        e = err(c.post("/v1/tasks/x", content=blob, headers=KEY), 409)
        assert e["code"] == "duplicate_artifact" and "x@1" in e["message"] and "allow_duplicate" in e["message"], e
        r = c.post("/v1/tasks/x?allow_duplicate=true", content=blob, headers=KEY)
        assert r.status_code == 201 and r.json()["version"] == 2


def test_writes_need_a_server_with_api_keys(setup, monkeypatch):
    with TestClient(app_for(setup, monkeypatch, keys=())) as c:
        r = c.post("/v1/tasks/x", content=setup[4][0][1])
        assert r.status_code == 403 and r.json()["error"]["code"] == "writes_disabled"
        assert c.delete("/v1/tasks/x").status_code == 403
