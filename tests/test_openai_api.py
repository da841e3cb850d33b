"""The OpenAI API as clients use it: every request field of the installed `openai` client is honoured
or refused with a 400 naming it; logprobs are the model's own (checked against a direct forward
pass); penalties follow OpenAI's formula; the real client works end to end (logprobs + echo, n > 1,
chat content parts, streams with usage)."""


import openai
import pytest
import torch
from conftest import tiny_model
from starlette.testclient import TestClient
from test_http import CHAT_TEMPLATE, Server, make_tasks
from tiny_tokenizer import tiny_tokenizer

from softprompt.loops.generate import SamplingParams, penalize
from softprompt.serve import Engine, Request
from softprompt.serve.http import ServerConfig, create_app
from softprompt.serve.schemas import ChatRequest, CompletionRequest


@pytest.fixture(scope="module")
def parts():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return model, tok, make_tasks(model, 2)


def direct_logprobs(model, prompt, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, by one plain forward pass (with the task's prompt)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = prompt(model, x, torch.ones_like(x)).logits[0] if prompt is not None else model(x).logits[0]
    lp = logits.float().log_softmax(-1)
    return torch.stack([lp[j - 1, ids[j]] for j in range(1, len(ids))])


def test_logprobs_are_the_models_own_and_do_not_change_greedy_output(parts):
    model, tok, tasks = parts
    engine = Engine(model, tok, tasks)
    text = "ba be bi bo"
    plain, scored, sampled = engine.generate([
        Request(prompt=text, task="task0", max_new_tokens=6),
        Request(prompt=text, task="task0", max_new_tokens=6, logprobs=3, prompt_logprobs=True),
        Request(prompt=text, task="task0", max_new_tokens=6, logprobs=0, temperature=1.5, top_k=5, seed=1)])
    assert scored.token_ids == plain.token_ids and scored.text == plain.text  # asking changes nothing
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    want = direct_logprobs(model, tasks["task0"], prompt_ids + scored.token_ids)
    assert scored.prompt_logprobs[0].logprob is None and len(scored.prompt_logprobs) == len(prompt_ids)
    got = torch.tensor([t.logprob for t in scored.prompt_logprobs[1:]] + [t.logprob for t in scored.logprobs])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    for t in scored.logprobs:  # top alternatives: sorted, 3 of them, the chosen greedy token first
        assert len(t.top) == 3 and t.top[0] == (t.token_id, t.logprob) and t.top[0][1] >= t.top[1][1] >= t.top[2][1]
    # sampling reports the model's logprobs too (before temperature and top-k), not the sampler's
    want = direct_logprobs(model, tasks["task0"], prompt_ids + sampled.token_ids)[len(prompt_ids) - 1:]
    assert torch.allclose(torch.tensor([t.logprob for t in sampled.logprobs]), want, atol=1e-5)


def test_penalties_follow_openai_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # token 1 generated twice, token 3 once: mu - c * 0.25 - (c > 0) * 0.5
    out = penalize(logits, [1, 3, 1], params)
    assert torch.allclose(out, torch.tensor([[1.0, 2.0 - 0.5 - 0.5, 3.0, 4.0 - 0.25 - 0.5, 5.0]]))
    assert torch.equal(penalize(logits, [1], SamplingParams()), logits)
    neg = penalize(logits, [4, 4], SamplingParams(frequency_penalty=-1.0))  # negative: encourages repetition
    assert neg[0, 4] == 7.0
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)


def test_the_engine_picks_greedy_tokens_under_penalties(parts):
    model, tok, tasks = parts
    engine = Engine(model, tok, tasks, keep_logits=True)
    plain, pen = engine.generate([Request(prompt="ba be", task="task1", max_new_tokens=12),
                                  Request(prompt="ba be", task="task1", max_new_tokens=12, presence_penalty=2.0,
                                          frequency_penalty=1.0, logprobs=0)])
    assert pen.token_ids != plain.token_ids  # the penalties changed the path
    params = SamplingParams(presence_penalty=2.0, frequency_penalty=1.0)
    for t, raw in enumerate(pen.logits):  # each step: the argmax of the penalized raw logits
        assert int(penalize(raw[None], pen.token_ids[:t], params).argmax()) == pen.token_ids[t]
        # and the reported logprob is the model's, before the penalties
        assert abs(pen.logprobs[t].logprob - float(raw.log_softmax(-1)[pen.token_ids[t]])) < 1e-6


def _fields(module) -> set[str]:
    """Every request field of an openai client's create-params module (streaming adds `stream`)."""
    return set(module.CompletionCreateParamsBase.__annotations__) | set(
        module.CompletionCreateParamsStreaming.__annotations__)


def test_every_openai_request_field_is_honoured_or_refused_by_name(parts):
    from openai.types import completion_create_params as completion_params
    from openai.types.chat import completion_create_params as chat_params

    model, tok, tasks = parts
    client = TestClient(create_app(Engine(model, tok, tasks).start(), config=ServerConfig(base_model_id="base")))
    try:
        cases = [("/v1/completions", CompletionRequest, _fields(completion_params), {"model": "base", "prompt": "ba"}),
                 ("/v1/chat/completions", ChatRequest, _fields(chat_params),
                  {"model": "base", "messages": [{"role": "user", "content": "ba"}]})]
        seen = {}
        for path, schema, fields, minimal in cases:
            assert {"logprobs", "echo" if schema is CompletionRequest else "top_logprobs", "n", "seed", "stop",
                    "presence_penalty", "frequency_penalty", "stream_options"} <= fields  # the walk sees them
            for field in sorted(fields - set(minimal)):
                if field in schema.model_fields:
                    seen[(path, field)] = "honoured"
                    continue
                # a value that asks for something: a field we lack must be refused, naming it
                r = client.post(path, json=dict(minimal, **{field: {"asks": "for something"}}))
                err = r.json().get("error", {})
                assert r.status_code == 400 and err.get("param") == field and field in err["message"], (path, field,
                                                                                                       r.text)
                seen[(path, field)] = "refused"
        assert seen[("/v1/completions", "echo")] == "honoured" and seen[("/v1/chat/completions", "tools")] == "refused"
        # a value that asks for nothing is accepted (clients send defaults explicitly)
        r = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "ba"}],
                                                      "tools": [], "store": False, "n": None, "temperature": None,
                                                      "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"model": "base", "prompt": "ba", "best_of": 2, "n": 2,
                                                 "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        # and the other refusals name their field too
        for path, body, param in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                {"type": "text", "text": "ba"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
             "messages.0.content.1.type"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ba"}], "top_logprobs": 2},
             "top_logprobs"),
            ("/v1/completions", {"prompt": "ba", "stream_options": {"include_usage": True}}, "stream_options"),
            ("/v1/completions", {"prompt": "ba", "best_of": 3}, "best_of"),
        ]:
            r = client.post(path, json=dict(body, model="base"))
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text)
        r = client.get("/v1/nowhere")  # a 404 in OpenAI's shape too
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    finally:
        client.app.state.engine.stop()


def _lp_of(model, tok, task, text, completion_ids):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids, direct_logprobs(model, task, ids + completion_ids).tolist()


def test_the_openai_client_end_to_end(parts):
    model, tok, tasks = parts
    engine = Engine(model, tok, tasks, max_batch_size=8)
    with Server(create_app(engine, config=ServerConfig(base_model_id="tiny-base"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        text = "ba be bi"
        # completions: logprobs with echo, greedy
        out = client.completions.create(model="task0", prompt=text, max_tokens=5, temperature=0, logprobs=2, echo=True)
        c = out.choices[0]
        ref = engine.generate([Request(prompt=text, task="task0", max_new_tokens=5)])[0]
        assert c.text == text + ref.text
        ids, want = _lp_of(model, tok, tasks["task0"], text, ref.token_ids)
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + len(ref.token_ids) == out.usage.prompt_tokens + out.usage.completion_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-5
        assert all(len(t) <= 2 for t in lp.top_logprobs[1:]) and lp.text_offset[0] == 0
        assert lp.text_offset == sorted(lp.text_offset)
        # n > 1, seeded sampling
        many = client.completions.create(model="task1", prompt=text, max_tokens=4, temperature=1.0, n=3, seed=5)
        assert [x.index for x in many.choices] == [0, 1, 2] and many.usage.prompt_tokens == len(ids)
        # chat: content as text parts, logprobs with alternatives
        parts_msg = [{"role": "user", "content": [{"type": "text", "text": "ka"}, {"type": "text", "text": "ke"}]}]
        plain_msg = [{"role": "user", "content": "ka\nke"}]
        a = client.chat.completions.create(model="tiny-base", messages=parts_msg, max_completion_tokens=4,
                                           temperature=0, logprobs=True, top_logprobs=2)
        b = client.chat.completions.create(model="tiny-base", messages=plain_msg, max_tokens=4, temperature=0)
        assert a.choices[0].message.content == b.choices[0].message.content
        content = a.choices[0].logprobs.content
        assert len(content) == a.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
        assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
        # a stream with usage: chunks carry no usage, the last carries it and no choices
        chunks = list(client.completions.create(model="task0", prompt=text, max_tokens=5, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, logprobs=1))
        assert all(ch.usage is None for ch in chunks[:-1]) and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and chunks[-1].usage.prompt_tokens == len(ids)
        assert "".join(ch.choices[0].text for ch in chunks[:-1]) == ref.text
        streamed_lps = [x for ch in chunks[:-1] if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
        assert max(abs(x - y) for x, y in zip(streamed_lps, want[len(ids) - 1:])) < 1e-5
        assert len(streamed_lps) == len(ref.token_ids)
        chat_chunks = list(client.chat.completions.create(model="tiny-base", messages=plain_msg, max_tokens=4,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True}))
        assert chat_chunks[-1].usage.completion_tokens == b.usage.completion_tokens
        assert "".join(ch.choices[0].delta.content or "" for ch in chat_chunks[:-1]) == b.choices[0].message.content
        # the refusal reaches the client as a 400 naming the field
        with pytest.raises(openai.BadRequestError, match="tools"):
            client.chat.completions.create(model="tiny-base", messages=plain_msg, tools=[{"type": "function", "function": {
                "name": "f", "parameters": {}}}])


def test_served_model_name(tmp_path):
    from softprompt.serve.config import ServeConfig
    from softprompt.serve.main import build_app

    base = tmp_path / "tiny-base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    app, config = build_app(ServeConfig.of(store=str(tmp_path / "store"), base=str(base),
                                            served_model_name="acme/tiny"))
    assert config.base_model_id == "acme/tiny"
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "acme/tiny"
        r = client.post("/v1/completions", json={"model": "acme/tiny", "prompt": "ba", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "acme/tiny"
