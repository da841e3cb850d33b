"""The off-task guard (issue 31, item 5): the score separates two synthetic input distributions, the
summary round-trips through its file exactly, and the engine scores each row of a mixed batch as it
would score it alone, changes no token under "warn", refuses before decoding under "reject" and
serves the bare model under "base"."""

import random

import pytest
import torch
from conftest import tiny_model
from test_engine import WordTok

from softprompt import hf, methods
from softprompt.core.offtask import OffTaskError, OffTaskSummary, auc, pool
from softprompt.io.artifact import load_artifact, read_card, save_artifact
from softprompt.io.offtask import read_summary, summary_file, write_summary
from softprompt.loops.offtask import pooled_states, prompt_kv, summarize
from softprompt.serve import Engine, Request

IN_WORDS, OFF_WORDS = list(range(4, 16)), list(range(50, 62))  # two disjoint word sets (token ids)


def texts(words, n, seed):
    rng = random.Random(seed)
    return [[rng.choice(words) for _ in range(rng.randint(8, 16))] for _ in range(n)]


def as_text(ids):
    return " ".join(map(str, ids))


def task_prompt(model, seed=0, P=4):
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=P, seed=seed, projection_dim=0)
    with torch.no_grad():
        for p in prompt.parameters():
            p.normal_(0, 0.5)
    return prompt


def fitted(model, prompt, words=IN_WORDS, seed=0):
    return summarize(model, texts(words, 160, seed), prompt_kv(model, prompt), heldout=texts(words, 40, seed + 1), k=8)


def test_score_separates_two_synthetic_distributions(model):
    prompt = task_prompt(model)
    s = fitted(model, prompt)
    kv = prompt_kv(model, prompt)
    in_scores = s.score(pooled_states(model, texts(IN_WORDS, 80, 7), kv, s.layer))
    off_scores = s.score(pooled_states(model, texts(OFF_WORDS, 80, 8), kv, s.layer))
    assert auc(off_scores, in_scores) >= 0.95
    assert s.meta["under"] == "prefix" and s.meta["n_fit"] == 160 and s.meta["n_heldout"] == 40
    assert s.layer == 1 and s.k == 8 and s.hidden_size == 48


def test_auc_counts_ties_half():
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([1.0, 2.0])) == 0.25


def test_layer_outputs_are_the_models_hidden_states(model):
    ids = torch.tensor([[5, 17, 33, 8]])
    want = model(input_ids=ids, output_hidden_states=True).hidden_states  # (L + 1) x (1, T, d)
    for stop in (False, True):
        with hf.layer_outputs(model, [1], stop=stop) as got:
            out = model(input_ids=ids)
            assert not stop  # a stopped pass never gets here
        assert torch.equal(got[1], want[1])  # (the last, L, is HF's after the final norm; ours before it)
    assert torch.equal(out.logits, model(input_ids=ids).logits)  # reading changed nothing
    with pytest.raises(ValueError):
        with hf.layer_outputs(model, [3]):
            pass


def test_pool_reads_each_rows_own_tokens():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    got = pool(h, [2, 4])
    assert torch.equal(got[0], h[0, 2:].mean(0)) and torch.equal(got[1], h[1].mean(0))


def test_summary_round_trips_exactly(tmp_path):
    model = tiny_model("llama")
    prompt = task_prompt(model)
    s = fitted(model, prompt)
    back = OffTaskSummary.from_bytes(s.to_bytes())
    assert back.layer == s.layer and back.threshold == s.threshold and back.residual == s.residual
    assert back.meta == s.meta
    for a, b in ((back.mean, s.mean), (back.components, s.components), (back.variances, s.variances)):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    x = torch.randn(5, 48)
    assert torch.equal(back.score(x), s.score(x))
    assert s.nbytes == (8 + 1) * 48 * 4 + 8 * 4
    # beside an artifact of either form: the card names it, the tensors (and their checksum) are untouched
    for path in (tmp_path / "dir", tmp_path / "one.safetensors"):
        save_artifact(prompt, path, model)
        sha = read_card(path)["tensor_sha256"]
        written = write_summary(path, s)
        assert written == summary_file(path) and written.is_file()
        card = read_card(path)
        assert card["tensor_sha256"] == sha and card["offtask"].endswith("offtask.safetensors")
        load_artifact(path, model)  # still loads, checksum and all
        got = read_summary(path, card)
        assert got.threshold == s.threshold and torch.equal(got.components, s.components)
    assert read_summary(tmp_path / "dir", {"offtask": "/etc/passwd.safetensors"}) is None  # only beside the artifact


def test_a_damaged_summary_is_refused():
    model = tiny_model("llama")
    blob = fitted(model, task_prompt(model)).to_bytes()
    with pytest.raises(OffTaskError):
        OffTaskSummary.from_bytes(blob[:len(blob) // 2])
    with pytest.raises(OffTaskError):
        OffTaskSummary.from_bytes(b"not a summary at all")


def guarded_tasks(model, tmp_path):
    """Two tasks with summaries (one an artifact on disk, one in memory), one without."""
    a, b, plain = task_prompt(model, 0), task_prompt(model, 1, P=6), task_prompt(model, 2, P=3)
    save_artifact(a, tmp_path / "a", model)
    write_summary(tmp_path / "a", fitted(model, a))
    b.offtask = fitted(model, b, seed=3)
    return {"a": str(tmp_path / "a"), "b": b, "plain": plain}, {"a": load_artifact(tmp_path / "a", model), "b": b}


def mixed_requests():
    reqs = []
    for j in range(10):
        words = OFF_WORDS if j % 3 == 0 else IN_WORDS
        task = ["a", "b", "plain", None][j % 4]
        reqs.append(Request(prompt=as_text(texts(words, 1, 100 + j)[0]), task=task, max_new_tokens=4, ignore_eos=True))
    return reqs


@pytest.mark.parametrize("max_batch_size", [16, 3])  # 3: rows join a running batch
def test_engine_scores_each_row_as_alone_and_changes_no_token(tmp_path, max_batch_size):
    model = tiny_model("llama")
    tasks, prompts = guarded_tasks(model, tmp_path)
    plain = Engine(model, WordTok(), tasks, max_batch_size=max_batch_size, keep_logits=True).generate(mixed_requests())
    engine = Engine(model, WordTok(), tasks, max_batch_size=max_batch_size, keep_logits=True, off_task="warn")
    guarded = engine.generate(mixed_requests())
    flagged = 0
    for req, p, g in zip(mixed_requests(), plain, guarded):
        assert g.token_ids == p.token_ids and torch.equal(g.logits, p.logits)  # the guard only reads
        if req.task not in prompts:  # no summary, or the bare model: no score
            assert g.off_task is None
            continue
        s = prompts[req.task].offtask if req.task == "b" else read_summary(tasks["a"], read_card(tasks["a"]))
        ids = [int(x) for x in req.prompt.split()]
        alone = float(s.score(pooled_states(model, [ids], prompt_kv(model, prompts[req.task]), s.layer))[0])
        assert g.off_task.score == pytest.approx(alone, rel=1e-4)
        assert g.off_task.off_task == (g.off_task.score > s.threshold)
        assert g.off_task.action == ("warn" if g.off_task.off_task else "none")
        flagged += g.off_task.off_task
        assert set(g.off_task.to_dict()) == {"score", "threshold", "off_task", "action"}
    assert flagged >= 2 and engine.stats["off_task_flagged"] == flagged


def test_reject_refuses_off_task_rows_before_decoding(tmp_path):
    model = tiny_model("llama")
    tasks, _ = guarded_tasks(model, tmp_path)
    plain = Engine(model, WordTok(), tasks).generate(mixed_requests())
    outs = Engine(model, WordTok(), tasks, off_task="reject").generate(mixed_requests())
    refused = 0
    for p, o in zip(plain, outs):
        if o.off_task is not None and o.off_task.off_task:
            refused += 1
            assert o.finish_reason == "error" and o.error_code == "off_task" and o.token_ids == []
            assert o.off_task.action == "reject" and "threshold" in o.error
        else:
            assert o.token_ids == p.token_ids  # the rows kept are served as they would be
    assert refused >= 2


def test_base_serves_off_task_rows_without_the_prefix(tmp_path):
    model = tiny_model("llama")
    tasks, _ = guarded_tasks(model, tmp_path)
    reqs = mixed_requests()
    plain = Engine(model, WordTok(), tasks).generate(reqs)
    bare = Engine(model, WordTok(), tasks).generate([Request(prompt=r.prompt, max_new_tokens=4, ignore_eos=True)
                                                     for r in mixed_requests()])
    outs = Engine(model, WordTok(), tasks, off_task="base").generate(mixed_requests())
    served_bare = 0
    for p, b, o in zip(plain, bare, outs):
        assert o.finish_reason == "length"
        if o.off_task is not None and o.off_task.off_task:
            served_bare += 1
            assert o.off_task.action == "base" and o.token_ids == b.token_ids
        else:
            assert o.token_ids == p.token_ids
    assert served_bare >= 2


def test_engine_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="off_task"):
        Engine(tiny_model("llama"), WordTok(), off_task="block")


def test_training_writes_a_summary_beside_the_best_artifact(tmp_path):
    from tiny_tokenizer import WORDS, tiny_tokenizer

    import softprompt as sp

    model, tok = tiny_model("llama"), tiny_tokenizer()
    rng = random.Random(0)
    rows = [{"input": " ".join(rng.choice(WORDS[:12]) for _ in range(8)), "output": rng.choice(WORDS)}
            for _ in range(40)]
    prompt = sp.create(model, sp.PrefixTuningConfig(num_virtual_tokens=3, projection_dim=0))
    sp.train(prompt, model, tok, rows, out=tmp_path / "run", steps=2, batch_size=4, eval_fraction=0.2,
             progress=False)
    card = read_card(tmp_path / "run" / "best")
    assert card["offtask"] == "best/offtask.safetensors"
    s = read_summary(tmp_path / "run" / "best", card)
    assert s.meta["under"] == "prefix" and s.meta["n_heldout"] >= 1 and s.threshold > 0


def test_a_store_entrys_summary_is_read_from_the_stores_files_only(tmp_path):
    from types import SimpleNamespace

    model = tiny_model("llama")
    s = fitted(model, task_prompt(model))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "abc.safetensors").write_bytes(s.to_bytes())
    (tmp_path / "elsewhere.safetensors").write_bytes(s.to_bytes())
    entry = SimpleNamespace(store=SimpleNamespace(root=tmp_path), sha256="0" * 64, path=tmp_path / "objects" / "x")
    assert read_summary(entry, {"offtask": "files/abc.safetensors"}).threshold == s.threshold
    assert read_summary(entry, {"offtask": "elsewhere.safetensors"}) is None
    assert read_summary(entry, {"offtask": "files/../elsewhere.safetensors"}) is None
    assert read_summary(entry, {}) is None


def test_a_damaged_summary_leaves_its_task_served_unguarded(tmp_path):
    model = tiny_model("llama")
    tasks, _ = guarded_tasks(model, tmp_path)
    summary_file(tmp_path / "a").write_bytes(b"damaged")
    req = Request(prompt=as_text(texts(OFF_WORDS, 1, 5)[0]), task="a", max_new_tokens=3, ignore_eos=True)
    want = Engine(model, WordTok(), tasks).generate([req])[0]
    got = Engine(model, WordTok(), tasks, off_task="reject").generate(
        [Request(prompt=req.prompt, task="a", max_new_tokens=3, ignore_eos=True)])[0]
    assert got.finish_reason == "length" and got.off_task is None and got.token_ids == want.token_ids


def test_http_reports_the_score_and_rejects_past_the_threshold():
    """The HTTP layer's wiring (serve/routers/completions.py): the verdict as `x-softprompt-off-task`
    and per choice in the `softprompt` extension; under "reject" an off-task prompt is a 422
    `off_task` in OpenAI's shape while an in-task one is served."""
    import httpx
    from test_http import Server
    from tiny_tokenizer import WORDS, tiny_tokenizer

    from softprompt.serve.http import ServerConfig, create_app

    model, tok = tiny_model("llama"), tiny_tokenizer()
    mine, other = WORDS[:6], WORDS[-6:]  # the task's inputs use few words; off-task ones others

    def sample(words, n, seed):
        rng = random.Random(seed)
        return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))) for _ in range(n)]

    def ids(ts):
        return [tok(t, add_special_tokens=False)["input_ids"] for t in ts]

    prompt = task_prompt(model)
    prompt.offtask = summarize(model, ids(sample(mine, 160, 0)), prompt_kv(model, prompt),
                               heldout=ids(sample(mine, 40, 1)), k=8)
    on, off = sample(mine, 1, 5)[0], sample(other, 1, 6)[0]
    for policy in ("warn", "reject"):
        engine = Engine(model, tok, {"t": prompt}, off_task=policy)
        with Server(create_app(engine, config=ServerConfig(base_model_id="base", off_task=policy))) as url:
            r_on, r_off = (httpx.post(url + "/v1/completions", json={"model": "t", "prompt": p, "max_tokens": 2},
                                      timeout=60) for p in (on, off))
            r_base = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": off, "max_tokens": 2},
                                timeout=60)
        assert r_on.status_code == 200 and r_on.headers["x-softprompt-off-task"].endswith("off_task=0")
        assert r_on.json()["choices"][0]["softprompt"]["off_task"]["action"] == "none"
        assert r_base.status_code == 200 and "x-softprompt-off-task" not in r_base.headers  # nothing to score against
        assert "softprompt" not in r_base.json()["choices"][0]
        if policy == "warn":
            assert r_off.status_code == 200 and r_off.headers["x-softprompt-off-task"].endswith("off_task=1")
            assert r_off.json()["choices"][0]["softprompt"]["off_task"]["action"] == "warn"
        else:
            assert r_off.status_code == 422 and r_off.json()["error"]["code"] == "off_task"
