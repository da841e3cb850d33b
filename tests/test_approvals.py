"""Approvals (store/approvals.py) and `serve --require-approved` (serve/resolver.py ApprovalGate):
every version is a draft until approved; approve/revoke are logged with who, when and why, and
optionally signed (Ed25519) over the artifact's checksums; a server with --require-approved serves
only approved versions (403 task_not_approved for the rest), sees a revocation on the next request
without a restart, and with --trust-key refuses an approval that is unsigned, signed by another key,
or no longer matches the artifact as stored (a tampered artifact, an edited approval). On SQLite and
on PostgreSQL."""

import hashlib
import json

import pytest
import torch
from conftest import tiny_model
from starlette.testclient import TestClient
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.cli import main
from softprompt.io.artifact import save_artifact
from softprompt.serve import Engine
from softprompt.serve.http import ServerConfig, create_app
from softprompt.serve.resolver import StoreResolver
from softprompt.serve.tasks import TaskRegistry
from softprompt.store import approvals
from softprompt.store.core import Store, StoreError


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    if request.param == "sqlite":
        return Store(tmp_path / "s")
    from services import new_database

    return Store(new_database(request.getfixturevalue("pg").dsn), str(tmp_path / "shared"))


def artifact(model, tmp_path, name, seed):
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=3, seed=seed, projection_dim=0)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return save_artifact(prompt, tmp_path / f"{name}.safetensors", model)


def app_for(store, model, **config):
    engine = Engine(model, tiny_tokenizer(), TaskRegistry(fallback=StoreResolver(store)), max_batch_size=4)
    return create_app(engine, store, ServerConfig(base_model_id="base", trail=False, **config))


def ask(client, model_name):
    return client.post("/v1/completions", json={"model": model_name, "prompt": "ba be", "max_tokens": 2,
                                                "temperature": 0})


def test_states_are_logged_with_who_when_why(store, llama, tmp_path):
    store.add("t", artifact(llama, tmp_path, "a", 0))
    store.add("t", artifact(llama, tmp_path, "b", 1))
    # a store made before approvals existed: no table, every version a draft
    assert [r["state"] for r in store.ls(all_versions=True)] == ["draft", "draft"]
    assert store.show("t@1")["state"] == "draft" and store.show("t@1")["approval"] is None
    token = store.version_token()
    d = store.approve("t@1", "alice", "passed review R-12")
    assert (d["state"], d["by"], d["note"], d["seq"], d["signed"]) == ("approved", "alice", "passed review R-12", 1,
                                                                       False)
    assert store.version_token() == token + 1  # servers notice the decision
    store.revoke("t@1", "bob", "leaks PII")
    store.approve("t@2", "alice", "")
    assert [(r["version"], r["state"]) for r in store.ls(all_versions=True)] == [(1, "revoked"), (2, "approved")]
    assert [(d["version"], d["seq"], d["state"], d["by"]) for d in store.decisions("t")] == \
        [(1, 1, "approved", "alice"), (1, 2, "revoked", "bob"), (2, 1, "approved", "alice")]
    assert store.show("t@1")["approval"]["note"] == "leaks PII" and store.latest_approved("t") == 2
    with pytest.raises(StoreError, match="name one version"):
        store.approve("t", "alice")  # never "whatever the latest is now"
    with pytest.raises(StoreError, match="--by must name who decides"):
        store.approve("t@2", "")
    with pytest.raises(StoreError, match="no version 9"):
        store.approve("t@9", "alice")
    store.rm("t@1")
    assert [d["version"] for d in store.decisions("t")] == [2]


def test_cli_approve_revoke_keygen_and_ls(tmp_path, llama, capsys):
    s = ["--store", str(tmp_path / "s")]
    Store(tmp_path / "s").add("t", artifact(llama, tmp_path, "a", 0))
    key = tmp_path / "k.pem"
    assert main(["store", "keygen", str(key)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600 and (tmp_path / "k.pem.pub").read_text().startswith("-----BEGIN")
    capsys.readouterr()
    assert main(["store", "keygen", str(key)]) == 2  # never overwrites a key
    assert "already exists" in capsys.readouterr().err
    assert main(["store", "approve", "t@1", "--by", "alice", "--note", "ok", "--key", str(key)] + s) == 0
    assert "t@1 approved by alice" in capsys.readouterr().out
    assert main(["store", "ls"] + s) == 0
    out = capsys.readouterr().out
    assert "state" in out.splitlines()[0] and "approved" in out.splitlines()[1]
    assert main(["store", "show", "t@1"] + s) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "approved" and shown["approval"]["signed"] is True
    for argv, fault in ((["store", "revoke", "t@1", "--note", "x"], "--by"),
                        (["store", "approve", "t", "--by", "a"], "name one version"),
                        (["store", "approve", "t@1", "--by", "a", "--key", str(tmp_path / "k.pem.pub")],
                         "not a PEM Ed25519 private key")):
        assert main(argv + s) == 2
        err = capsys.readouterr().err
        assert fault in err and len(err.strip().splitlines()) == 1
    assert main(["store", "revoke", "t@1", "--by", "bob", "--note", "bad"] + s) == 0
    assert Store(tmp_path / "s").ls()[0]["state"] == "revoked"


def test_require_approved_serves_only_approved_and_sees_revocation_at_once(store, llama, tmp_path):
    store.add("t", artifact(llama, tmp_path, "a", 0))
    with TestClient(app_for(store, llama, require_approved=True)) as client:
        r = ask(client, "t")
        assert r.status_code == 403 and r.json()["error"]["code"] == "task_not_approved"
        assert "t@1 is draft" in r.json()["error"]["message"] and r.json()["error"]["param"] == "model"
        assert ask(client, "base").status_code == 200  # the base model is no task: always served
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base"]  # what it serves
        store.approve("t@1", "alice", "ok")
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "t"]
        assert ask(client, "t").status_code == 200 and ask(client, "t@1").status_code == 200
        store.add("t", artifact(llama, tmp_path, "b", 1))  # a draft v2: the bare name keeps serving v1
        assert ask(client, "t").status_code == 200
        r = ask(client, "t@2")
        assert r.status_code == 403 and "t@2 is draft" in r.json()["error"]["message"]
        store.revoke("t@1", "bob", "leaks PII")  # no restart
        r = ask(client, "t@1")
        assert r.status_code == 403 and "revoked by bob: leaks PII" in r.json()["error"]["message"]
        r = ask(client, "t")  # no approved version left
        assert r.status_code == 403 and "t@2 is draft" in r.json()["error"]["message"]
        store.approve("t@2", "alice", "")
        assert ask(client, "t").status_code == 200
    with TestClient(app_for(store, llama)) as client:  # without the flag: every version, as before
        assert ask(client, "t@1").status_code == 200


def test_trust_key_needs_a_signature_over_the_artifact_as_stored(tmp_path, llama):
    store = Store(tmp_path / "s")
    store.add("t", artifact(llama, tmp_path, "a", 0))
    good, _ = approvals.keygen(tmp_path / "good.pem")
    other, _ = approvals.keygen(tmp_path / "other.pem")
    app = app_for(store, llama, require_approved=True, trust_keys=(str(tmp_path / "good.pem.pub"),))
    with TestClient(app) as client:
        store.approve("t@1", "alice", "unsigned")
        r = ask(client, "t@1")
        assert r.status_code == 403 and "not signed" in r.json()["error"]["message"]
        store.approve("t@1", "mallory", "", key=other)
        assert "does not trust" in ask(client, "t@1").json()["error"]["message"]
        store.approve("t@1", "alice", "signed", key=good)
        assert ask(client, "t@1").status_code == 200
        # An edited approval (who approved it) no longer matches its signature.
        with store._write() as db:
            db.execute("UPDATE approvals SET by_name = 'mallory' WHERE name = 't' AND seq = 3")
        r = ask(client, "t@1")
        assert r.status_code == 403 and "does not match the artifact as stored now" in r.json()["error"]["message"]
        with store._write() as db:
            db.execute("UPDATE approvals SET by_name = 'alice' WHERE name = 't' AND seq = 3")
        assert ask(client, "t@1").status_code == 200
        # The artifact swapped after approval, file and index row alike (someone who can write the
        # store): the store's own checks pass, the signature does not.
        other_blob = store.object_path(store.show("t@1")["sha256"]).read_bytes()
        swapped = Store(tmp_path / "s2")
        swapped.add("x", artifact(llama, tmp_path, "evil", 5))
        evil = swapped.object_path(swapped.show("x@1")["sha256"]).read_bytes()
        assert evil != other_blob
        sha = hashlib.sha256(evil).hexdigest()
        store._put(store.object_path(sha), evil)
        with store._write() as db:
            db.execute("UPDATE tasks SET sha256 = ?, size = ? WHERE name = 't'", (sha, len(evil)))
        r = ask(client, "t@1")
        assert r.status_code == 403 and "does not match the artifact as stored now" in r.json()["error"]["message"]
    with TestClient(app_for(store, llama, require_approved=True)) as client:  # no trust key: state alone
        assert ask(client, "t@1").status_code == 200
    # `store verify --trust-key` finds the same, offline, for every approved version
    assert store.verify() == []
    problems = store.verify([tmp_path / "good.pem.pub"])
    assert len(problems) == 1 and problems[0].startswith("t@1 is approved, but its signed approval does not match")
    assert main(["store", "verify", "--trust-key", str(tmp_path / "good.pem.pub"), "--store", str(tmp_path / "s")]) == 2


def test_require_approved_options(tmp_path):
    from softprompt.serve.config import ServeConfig

    with pytest.raises(ValueError, match="needs --require-approved"):
        ServeConfig.of(trust_keys=("k.pub",))
    cfg = ServeConfig.of(require_approved=True, trust_keys=["a.pub", "b.pub"], trail_max_rows=5)
    assert cfg.server.trust_keys == ("a.pub", "b.pub") and cfg.server.trail
    from softprompt.cli import parse_config_command

    parsed = parse_config_command("serve", ["--require-approved", "--trust-key", "a.pub", "--trust-key", "b.pub",
                                            "--no-trail", "--trail-max-rows", "7"])
    assert (parsed.server.require_approved, parsed.server.trust_keys, parsed.server.trail,
            parsed.server.trail_max_rows) == (True, ("a.pub", "b.pub"), False, 7)
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM Ed25519 public key"):
        approvals.load_trusted([tmp_path / "bad.pub"])


def test_migrate_copies_approvals_and_signatures_stay_valid(tmp_path, llama):
    from softprompt.store.backends.migrate import migrate

    src = Store(tmp_path / "src")
    src.add("t", artifact(llama, tmp_path, "a", 0))
    key, _ = approvals.keygen(tmp_path / "k.pem")
    src.approve("t@1", "alice", "ok", key=key)
    dst = Store(tmp_path / "dst")
    migrate(src, dst)
    d = dst.approval("t", 1)
    assert d["state"] == "approved" and d["signed"]
    blob = dst.object_path(d["sha256"]).read_bytes()
    assert approvals.signature_problem(d, blob, approvals.load_trusted([tmp_path / "k.pem.pub"])) is None
    assert dst.verify([tmp_path / "k.pem.pub"]) == []


def test_serve_flags_reach_the_server(tmp_path):
    """`softprompt serve --require-approved --trust-key K --trail-max-rows N` as build_app builds it."""
    from softprompt.io.load import load_base
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.main import build_app

    base_dir = tmp_path / "tiny-base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model, _ = load_base(base_dir)
    store = Store(tmp_path / "s")
    store.add("t", artifact(model, tmp_path, "a", 0))
    key, pub = approvals.keygen(tmp_path / "k.pem")
    store.approve("t@1", "alice", "ok", key=key)
    app, config = build_app(ServeConfig.of(store=str(tmp_path / "s"), base=str(base_dir), require_approved=True,
                                           trust_keys=[str(pub)], trail_max_rows=10))
    assert config.require_approved and config.trust_keys == (str(pub),)
    with TestClient(app) as client:
        assert ask(client, "t").status_code == 200
        store.revoke("t@1", "bob", "bad")
        assert ask(client, "t").json()["error"]["code"] == "task_not_approved"
    assert app.state.trail.max_rows == 10
    assert [(r["version"], r["status"]) for r in store.history("t")] == [(1, 403), (1, 200)]
