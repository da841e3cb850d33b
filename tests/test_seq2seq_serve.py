"""Serving encoder-decoder tasks (softprompt/serve/seq2seq.py): a batch mixing tasks, methods and the
bare model gives each row what it gets alone; the HTTP API over it (completions, streaming,
OpenAI-shaped errors, a decoder-only task refused); `build_app` picks the engine by the base's family."""

import json

import pytest
import torch
from conftest import tiny_model
from fastapi.testclient import TestClient
from tiny_tokenizer import tiny_tokenizer
from transformers import T5Config, T5ForConditionalGeneration

from softprompt import methods
from softprompt.families.seq2seq.core import Seq2SeqPrefix
from softprompt.families.seq2seq.generate import generate
from softprompt.families.seq2seq.methods import create
from softprompt.io.artifact import save_artifact
from softprompt.serve import Engine, QueueFull, Request
from softprompt.serve.http import ServerConfig, create_app
from softprompt.serve.seq2seq import Seq2SeqEngine

PROMPTS = ["ba be bi bo", "ca ce", "da de di do du fa", "ga"]


def tiny_t5():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=2, dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg).float().eval().requires_grad_(False)


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=16,
                     init_std=0.2, dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=2, forced_eos_token_id=None)
    return BartForConditionalGeneration(cfg).float().eval().requires_grad_(False)


def seq2seq_tasks(model):
    """A prefix at all three sites (3 tokens) and a soft prompt (4 tokens), with non-trivial tensors."""
    torch.manual_seed(1)
    prefix = create("prefix", model, None, num_virtual_tokens=3, projection_dim=0)
    prompt = create("prompt", model, None, num_virtual_tokens=4, init="random")
    with torch.no_grad():
        for p in [*prefix.parameters(), *prompt.parameters()]:
            p.normal_(0, 1.0)
    return {"pre": prefix, "soft": prompt}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2s")
    model, tok = tiny_t5(), tiny_tokenizer()
    prompts = seq2seq_tasks(model)
    tasks = {name: save_artifact(p, tmp / name, model) for name, p in prompts.items()}  # served from files
    llama = tiny_model("llama")
    tasks["causal"] = save_artifact(methods.create("prefix_tuning", llama, num_virtual_tokens=2, projection_dim=0),
                                    tmp / "causal", llama)
    tasks["causal_mem"] = methods.create("prompt_tuning", llama, num_virtual_tokens=2)  # in memory
    return model, tok, prompts, tasks


def alone(model, tok, prompt, text, n):
    """What softprompt.families.seq2seq.generate gives for one prompt by itself (greedy)."""
    return generate(model, tok, [text], None if prompt is None else prompt.to_kv_prefix(model), max_new_tokens=n)[0]


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_a_mixed_batch_equals_each_request_alone(stack, arch, tmp_path):
    model, tok, prompts, tasks = stack
    if arch == "bart":  # learned positions: decoder rows with different prefix lengths are shifted per row
        model = tiny_bart()
        prompts = seq2seq_tasks(model)
        tasks = {name: save_artifact(p, tmp_path / name, model) for name, p in prompts.items()}
    engine = Seq2SeqEngine(model, tok, tasks, max_batch_size=8)
    reqs = [Request(task="pre", prompt=PROMPTS[0], max_new_tokens=6),
            Request(task="soft", prompt=PROMPTS[1], max_new_tokens=3),  # leaves the batch early
            Request(task=None, prompt=PROMPTS[2], max_new_tokens=5),
            Request(task="soft", prompt=PROMPTS[3], max_new_tokens=6),
            Request(task="pre", prompt=PROMPTS[1], max_new_tokens=4, temperature=0.9, seed=7)]
    handles = [engine.submit(r) for r in reqs]
    assert engine.step() and not engine.step()  # one batch held them all
    outs = [h.result() for h in handles]
    assert engine.stats["steps"] == 6 and engine.stats["batch_rows_sum"] == 6 + 3 + 5 + 6 + 4
    texts = []
    for r, o in zip(reqs[:4], outs):
        want = alone(model, tok, prompts.get(r.task), r.prompt, r.max_new_tokens)
        assert o.text == want and o.finish_reason in ("stop", "length") and o.prompt_tokens == len(r.prompt.split())
        texts.append(o.text)
    assert any(texts) and texts[0] != alone(model, tok, None, PROMPTS[0], 6)  # the prompt matters
    # a seeded sampled row draws the same tokens in a fresh batch by itself
    again = Seq2SeqEngine(model, tok, tasks).generate([reqs[4]])[0]
    assert again.token_ids == outs[4].token_ids
    # the compiled prefixes are cached, counted by their tensors' bytes
    st = engine.prefixes.stats()
    want_bytes = sum(t.numel() * 4 for p in prompts.values() for t in vars(p.to_kv_prefix(model)).values()
                     if isinstance(t, torch.Tensor))
    assert st["tasks"] == 2 and st["bytes"] == want_bytes and st["misses"] == 2 and st["hits"] == 2
    if arch == "bart":  # 16 learned positions: a decoder prefix of 3 + 14 new tokens, a soft prompt of 4 + 13 tokens
        long = engine.generate([Request(task="pre", prompt="ba", max_new_tokens=14),
                                Request(task="soft", prompt=" ".join(["ba"] * 13), max_new_tokens=2)])
        assert [o.error_code for o in long] == ["prompt_too_long"] * 2


def test_engine_errors_queue_cancel_and_stream(stack):
    model, tok, prompts, tasks = stack
    engine = Seq2SeqEngine(model, tok, tasks, max_batch_size=4, max_queue=4, max_new_tokens_limit=8)
    bad = engine.generate([Request(task="nope", prompt="ba", max_new_tokens=4),
                           Request(task="causal", prompt="ba", max_new_tokens=4),
                           Request(task="causal_mem", prompt="ba", max_new_tokens=4),
                           Request(task="pre", prompt="ba", max_new_tokens=9)])
    assert [o.error_code for o in bad] == ["unknown_task", "task_refused", "task_refused", "bad_request"]
    assert "causal_lm" in bad[1].error and "seq2seq" in bad[1].error and "causal_lm" in bad[2].error
    h = engine.submit(Request(task="pre", prompt="ba be", max_new_tokens=4))
    for w in ("ba", "be", "bo"):
        engine.submit(Request(prompt=w, max_new_tokens=4))
    with pytest.raises(QueueFull):
        engine.submit(Request(prompt="bi", max_new_tokens=4))
    h.cancel()
    engine.step()
    assert h.result().finish_reason == "cancelled" and engine.status()["waiting"] == 0
    events = list(engine.stream(Request(task="soft", prompt=PROMPTS[0], max_new_tokens=6)))
    assert "".join(e.text for e in events) == alone(model, tok, prompts["soft"], PROMPTS[0], 6)
    # a decoder-only engine refuses a seq2seq task (artifact or in memory)
    llama = tiny_model("llama")
    dec = Engine(llama, tiny_tokenizer(), {"s2s": tasks["pre"], "mem": prompts["soft"]})
    outs = dec.generate([Request(task="s2s", prompt="ba"), Request(task="mem", prompt="ba")])
    assert [o.error_code for o in outs] == ["task_refused"] * 2 and "seq2seq" in outs[0].error


def sse(text: str) -> list:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_http_completions_streaming_and_errors(stack):
    model, tok, prompts, tasks = stack
    engine = Seq2SeqEngine(model, tok, tasks, max_batch_size=8, max_new_tokens_limit=32)
    app = create_app(engine, config=ServerConfig(base_model_id="tiny-t5"))
    with TestClient(app) as client:
        for task in ("pre", "soft", "tiny-t5"):
            r = client.post("/v1/completions", json={"model": task, "prompt": PROMPTS[:2], "max_tokens": 5,
                                                      "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            want = [alone(model, tok, prompts.get(task), p, 5) for p in PROMPTS[:2]]
            assert [c["text"] for c in body["choices"]] == want
            assert body["usage"]["prompt_tokens"] == 4 + 2
        r = client.post("/v1/completions", json={"model": "pre", "prompt": PROMPTS[2], "max_tokens": 6,
                                                  "temperature": 0, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = sse(r.text)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == alone(model, tok, prompts["pre"], PROMPTS[2], 6)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert [m["id"] for m in client.get("/v1/models").json()["data"]][0] == "tiny-t5"
        assert "softprompt_generated_tokens" in client.get("/metrics").text

        def error(r, status, code=None):
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            if code:
                assert err["code"] == code
            return err

        ask = {"prompt": "ba", "max_tokens": 4}
        error(client.post("/v1/completions", json={"model": "nope", **ask}), 404, "model_not_found")
        err = error(client.post("/v1/completions", json={"model": "causal", **ask}), 400, "task_refused")
        assert "causal_lm" in err["message"] and "seq2seq" in err["message"]
        error(client.post("/v1/completions", json={"model": "pre", "prompt": "ba", "temperature": -1}), 400)
        error(client.post("/v1/completions", json={"model": "pre", "prompt": "ba", "max_tokens": 99}), 400,
              "bad_request")
        error(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
        err = error(client.post("/v1/chat/completions", json={"model": "pre", "messages": [
            {"role": "user", "content": "ba"}]}), 400, "no_chat_template")
        assert "/v1/completions" in err["message"]
        # known before the first token: a real HTTP error, not a 200 with an error event (issue 13)
        error(client.post("/v1/completions", json={"model": "causal", **ask, "stream": True}), 400, "task_refused")


def test_build_app_serves_a_store_on_a_t5_base(stack, tmp_path):
    from softprompt.io.load import load_base
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.main import build_app
    from softprompt.store.core import Store

    _, tok, _, tasks = stack
    base = tmp_path / "t5"
    tiny_t5().save_pretrained(base)
    tok.save_pretrained(base)
    model, tok2 = load_base(base)
    task = create("prefix", model, None, num_virtual_tokens=2, projection_dim=0, parts=("decoder", "cross"))
    with torch.no_grad():
        for p in task.parameters():
            p.normal_(0, 1.0)
    store = Store(tmp_path / "store")
    store.add("summ", save_artifact(task, tmp_path / "summ", model))
    store.add("causal", tasks["causal"])
    app, config = build_app(ServeConfig.of(store=str(tmp_path / "store"), base=str(base)))
    assert isinstance(app.state.engine, Seq2SeqEngine) and config.base_model_id == "t5"
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "summ", "prompt": PROMPTS[0], "max_tokens": 5,
                                                  "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == alone(model, tok2, task, PROMPTS[0], 5)
        assert client.post("/v1/completions", json={"model": "causal", "prompt": "ba"}).status_code == 400
        # with a chat template, the rendered conversation is the encoder input
        app.state.engine.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        r = client.post("/v1/chat/completions", json={"model": "summ", "max_tokens": 5, "temperature": 0,
                                                       "messages": [{"role": "user", "content": PROMPTS[1]}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == alone(model, tok2, task, PROMPTS[1] + " ", 5)
    assert isinstance(task.to_kv_prefix(model), Seq2SeqPrefix)
