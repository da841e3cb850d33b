"""`softprompt audit` on tiny random models: the report's three files and their sections, a
self-contained HTML page, the discrete search never ending worse than its projection (and the
projection exact where the prompt is made of real tokens), the verdict's thresholds, and one-line
refusals (an existing OUT, a bad reference)."""

import json
import re
from pathlib import Path

import pytest
from conftest import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer, word_id

from softprompt import cli, methods
from softprompt.auditing.behaviour import compare_set, is_refusal
from softprompt.auditing.config import AuditConfig
from softprompt.auditing.discrete import approximate
from softprompt.auditing.report import verdict
from softprompt.auditing.run import PROBES, probe_texts, run_audit
from softprompt.io.artifact import save_artifact

INPUTS = [" ".join(WORDS[i:i + 5]) for i in range(0, 60, 5)]
SMALL = AuditConfig(max_inputs=6, max_probes=6, max_new_tokens=6, kl_tokens=4, search_inputs=4)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), tiny_tokenizer()


def _inputs(tmp_path) -> Path:
    p = tmp_path / "inputs.txt"
    p.write_text("\n".join(INPUTS) + "\n")
    return p


def test_cli_writes_markdown_html_and_json_with_every_section(tmp_path, base_dir, capsys):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    art = save_artifact(methods.create("prefix_tuning", model, tok, num_virtual_tokens=4, init="random", seed=1),
                        tmp_path / "art", model)
    out = tmp_path / "report"
    rc = cli.main(["audit", str(art), "--out", str(out), "--base", str(base_dir), "--inputs", str(_inputs(tmp_path)),
                   "--max-inputs", "5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "overall:" in captured.out
    assert {p.name for p in out.iterdir()} == {"audit.md", "audit.html", "audit.json", "behaviour.png", "discrete.png"}
    report = json.loads((out / "audit.json").read_text())
    assert {"provenance", "behaviour", "nearest_tokens", "discrete", "verdict", "options"} <= set(report)
    assert report["provenance"]["method"] == "prefix_tuning"
    assert report["provenance"]["training_data"]["path"] == "not recorded"  # never invented
    assert report["provenance"]["published"]["store"] == "not recorded"
    assert report["behaviour"]["task"]["summary"]["inputs"] == 5
    assert report["behaviour"]["probes"]["summary"]["inputs"] == len(probe_texts())
    assert [r["input"] for r in report["behaviour"]["task"]["rows"]] == INPUTS[:5]
    assert report["verdict"]["overall"] in ("PASS", "FAIL")
    assert [c["check"] for c in report["verdict"]["checks"]] == ["off-task drift", "refusal change",
                                                                  "off-task loss increase"]
    html = (out / "audit.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.I)
    assert html.count("data:image/png;base64,") == 2
    md = (out / "audit.md").read_text()
    for head in ("## Verdict", "## Provenance", "## Behaviour", "## What the prefix says"):
        assert head in md


def test_refuses_an_existing_out_in_one_line_before_loading(tmp_path, capsys):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    art = save_artifact(methods.create("prompt_tuning", model, tok, num_virtual_tokens=2), tmp_path / "a", model)
    (tmp_path / "out").mkdir()
    assert cli.main(["audit", str(art), "--out", str(tmp_path / "out"), "--base", "never-loaded"]) == 2  # refused before any load
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]


@pytest.mark.parametrize("ref", ["no/such/artifact", "nosuchtask", "bad name!"])
def test_a_bad_reference_is_one_line_and_exit_2(tmp_path, capsys, ref):
    rc = cli.main(["audit", ref, "--store", str(tmp_path / "store"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("softprompt audit: error:"), err
    assert not (tmp_path / "o").exists()


def test_a_store_task_is_audited_with_who_published_it(tmp_path, tiny):
    from softprompt.store.core import Store

    model, tok = tiny
    prompt = methods.create("prompt_tuning", model, tok, num_virtual_tokens=3, init="random", seed=2)
    art = save_artifact(prompt, tmp_path / "a", model, metrics={"eval_loss": 1.5})
    store = Store(tmp_path / "store")
    store.add("weather", art, model)
    store.add("weather", save_artifact(methods.create("prompt_tuning", model, tok, num_virtual_tokens=3, init="random",
                                                      seed=5), tmp_path / "b", model), model)
    store.approve("weather@2", "alice", "reviewed in the audit")
    approved = run_audit("weather", model, tok, tmp_path / "r2", inputs=str(_inputs(tmp_path)),
                         store=str(tmp_path / "store"), config=SMALL, progress=False)["provenance"]["published"]
    assert (approved["version"], approved["state"], approved["decided_by"], approved["note"]) == \
        (2, "approved", "alice", "reviewed in the audit")
    report = run_audit("weather@1", model, tok, tmp_path / "r", inputs=str(_inputs(tmp_path)),
                       store=str(tmp_path / "store"), config=SMALL, progress=False)
    pub = report["provenance"]["published"]
    assert (pub["task"], pub["version"], pub["state"]) == ("weather", 1, "draft")
    assert pub["decided_by"] == "not recorded"
    assert report["provenance"]["metrics"] == {"eval_loss": 1.5}
    assert len(report["nearest_tokens"]) == 3  # prompt tuning: inspect's nearest tokens per virtual token


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_search_never_ends_worse_than_the_projection(tiny, method):
    model, tok = tiny
    prompt = methods.create(method, model, tok, num_virtual_tokens=4, init="random", seed=3) if method != "p_tuning" \
        else methods.create(method, model, tok, num_virtual_tokens=4, seed=3)
    kv = prompt.to_kv_prefix(model)
    cfg = AuditConfig(max_new_tokens=8, kl_tokens=6, search_rounds=2, search_candidates=4)
    behaviour = compare_set(model, tok, INPUTS[:6], kv, cfg)
    d = approximate(prompt, model, tok, behaviour["input_ids"], behaviour["prefixed_ids"], list(range(4, 96)), cfg)
    proj, best = d["projection"], d["search"]
    assert best["next_token_agreement"] >= proj["next_token_agreement"]
    assert best["kl"] <= proj["kl"]
    for a, b in zip(d["trace"], d["trace"][1:]):  # each accepted swap improves one figure, worsens none
        assert b["agreement"] >= a["agreement"] and b["kl"] <= a["kl"] and (b["agreement"], b["kl"]) != (a["agreement"], a["kl"])
    assert len(best["ids"]) == d["k"] == 4
    assert d["evaluations"] > 1


def test_a_prompt_made_of_tokens_projects_back_to_them_exactly(tiny):
    """Prompt tuning started from token ids is those tokens' embeddings; prefix tuning started from a
    text is that text's compiled K/V: the projection finds the tokens, and the hard prompt then is
    the prefix (KL 0, every answer the same)."""
    model, tok = tiny
    words = ["po", "ba", "ki", "mu"]
    ids = [word_id(w) for w in words]
    cfg = AuditConfig(max_new_tokens=6, kl_tokens=4, search_rounds=1)
    for prompt in (methods.create("prompt_tuning", model, tok, num_virtual_tokens=4, init="tokens", init_tokens=ids),
                   methods.create("prefix_tuning", model, tok, num_virtual_tokens=4, init="text",
                                  init_text=" ".join(words), projection_dim=0)):
        beh = compare_set(model, tok, INPUTS[:4], prompt.to_kv_prefix(model), cfg)
        d = approximate(prompt, model, tok, beh["input_ids"], beh["prefixed_ids"], sorted(set(ids) | {5, 40, 70}), cfg)
        assert d["projection"]["ids"] == ids, prompt.method
        assert d["projection"]["tokens"] == words
        assert d["projection"]["next_token_agreement"] == 1.0 and d["projection"]["exact_match"] == 1.0
        assert d["projection"]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert d["search"]["ids"] == ids  # nothing beats exact


def test_verdict_compares_each_figure_with_its_threshold():
    probes = {"mean_kl": 0.4, "refusal_rate_base": 0.5, "refusal_rate_prefixed": 0.25, "mean_loss_change": 0.2}
    v = verdict(probes, AuditConfig(max_offtask_drift=0.5, max_refusal_change=0.25, max_offtask_loss_increase=0.1))
    assert [(c["figure"], c["result"]) for c in v["checks"]] == [(0.4, "PASS"), (0.25, "PASS"), (0.2, "FAIL")]
    assert v["overall"] == "FAIL"
    assert verdict(probes, AuditConfig(max_offtask_drift=0.5, max_refusal_change=0.25, max_offtask_loss_increase=0.2))["overall"] == "PASS"
    # nothing measured (no probes) is no pass
    assert verdict({"mean_kl": None, "refusal_rate_base": None, "mean_loss_change": None}, AuditConfig())["overall"] == "FAIL"


def test_options_are_checked():
    with pytest.raises(ValueError, match="search_rounds"):
        AuditConfig(search_rounds=-1)
    with pytest.raises(ValueError, match="max_offtask_drift"):
        AuditConfig(max_offtask_drift=float("nan"))
    with pytest.raises(ValueError, match="probe_format"):
        AuditConfig(probe_format="html")


def test_refusal_heuristic_and_the_shipped_probes():
    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("I\u2019m unable to do this")
    assert not is_refusal("Oslo: rain, high of 12 degrees, strong wind.")
    probes = probe_texts()
    assert len(probes) >= 40 and {p["kind"] for p in probes} == {"general", "other_language", "base_refuses"}
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "assets/probes/*.jsonl" in pyproject and PROBES.name == "offtask.jsonl"


def test_the_package_root_exports_it():
    import softprompt as sp

    assert callable(sp.audit) and sp.AuditConfig is AuditConfig


def test_without_task_inputs_the_search_fits_the_probes_and_the_data_file_is_described(tmp_path, tiny):
    model, tok = tiny
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": w, "output": w}) + "\n" for w in WORDS[:7]))
    prompt = methods.create("prompt_tuning", model, tok, num_virtual_tokens=2, init="random", seed=4)
    art = save_artifact(prompt, tmp_path / "a", model, dataset=str(data))
    report = run_audit(str(art), model, tok, tmp_path / "r", config=SMALL, progress=False)
    assert report["behaviour"]["task"]["rows"] == [] and report["behaviour"]["task_source"].startswith("none")
    assert report["discrete"]["fitted_on"].startswith("off-task probes")
    td = report["provenance"]["training_data"]
    import hashlib

    assert (td["rows"], td["sha256"]) == (7, hashlib.sha256(data.read_bytes()).hexdigest())
    assert td["sample_rows"][0] == json.dumps({"input": WORDS[0], "output": WORDS[0]})
    # a card naming a file that is no data format is not read (nor quoted in the report)
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    from softprompt.auditing.provenance import data_file

    assert data_file(str(secret))["readable"] is False and "sample_rows" not in data_file(str(secret))


def test_teacher_forcing_scores_the_answer_tokens_of_each_row(tiny):
    """A hard prompt compiled into a KV prefix is those tokens written out (compile_ids is exact), so
    the answer's log-probabilities under it equal the bare model's with the tokens prepended; and a
    row's figures do not depend on the other rows of its left-padded batch."""
    import torch

    from softprompt.auditing.behaviour import answer_logprobs
    from softprompt.hf.prefix import compile_ids

    model, tok = tiny
    hard = [word_id("po"), word_id("ba")]
    xs, ys = [[5, 6, 7, 8, 9], [10, 11]], [[20, 21, 22], [30]]
    prefixed = answer_logprobs(model, tok, xs, ys, compile_ids(model, hard))
    written = answer_logprobs(model, tok, [hard + x for x in xs], ys, None)
    alone = [answer_logprobs(model, tok, [x], [y], None)[0] for x, y in zip(xs, ys)]
    batch = answer_logprobs(model, tok, xs, ys, None)
    for p, w, a, b, y in zip(prefixed, written, alone, batch, ys):
        assert p.shape == (len(y), model.config.vocab_size)
        torch.testing.assert_close(p, w, atol=1e-5, rtol=0)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_python_api_refuses_an_existing_out_unless_told(tmp_path, tiny):
    import softprompt as sp

    model, tok = tiny
    art = save_artifact(methods.create("prefix_tuning", model, tok, num_virtual_tokens=2, init="random", seed=6),
                        tmp_path / "a.safetensors", model)
    out = tmp_path / "r"
    out.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        sp.audit(str(art), out, model=model, tokenizer=tok, config=SMALL)
    with pytest.raises(ValueError, match="tokenizer"):
        sp.audit(str(art), out, model=model, config=SMALL, overwrite=True)
    report = sp.audit(str(art), out, model=model, tokenizer=tok, inputs=str(_inputs(tmp_path)), config=SMALL,
                      overwrite=True, progress=False)
    assert json.loads((out / "audit.json").read_text())["verdict"] == report["verdict"]
    assert report["nearest_tokens"] is None and len(report["discrete"]["candidates"]) == 2  # layer-0 neighbours


def test_a_peft_adapter_directory_is_audited_with_what_it_records(tmp_path, tiny):
    from softprompt.io.peft import export_peft

    model, tok = tiny
    prompt = methods.create("prompt_tuning", model, tok, num_virtual_tokens=3, init="random", seed=7)
    peft_dir = export_peft(prompt, tmp_path / "peft", model)
    report = run_audit(str(peft_dir), model, tok, tmp_path / "r", inputs=str(_inputs(tmp_path)), config=SMALL,
                       progress=False)
    prov = report["provenance"]
    assert prov["source"]["kind"] == "PEFT adapter directory"
    assert (prov["method"], prov["num_virtual_tokens"]) == ("prompt_tuning", 3)
    assert prov["created"] == "not recorded" and prov["training_data"]["path"] == "not recorded"
