"""vLLM's sampling fields, honoured as vLLM defines them (its SamplingParams and sampler), and every
other request field honoured, a label, or refused with a 400 naming it: the exact logits transform
(`penalize`, in vLLM's order), then each field's effect on the engine's tokens and through the HTTP
API, per row in mixed batches."""

import pytest
import torch
from conftest import ROWS, tiny_model
from starlette.testclient import TestClient
from test_engine import WordTok, text
from test_http import CHAT_TEMPLATE, make_tasks

from softprompt.loops.generate import (
    SamplingParams,
    bad_words_ids,
    cut_at_stop,
    generate_ids,
    penalize,
    pick_next,
)
from softprompt.serve import Engine, Request
from softprompt.serve.http import ServerConfig, create_app

EOS = 2  # the tiny models' eos_token_id (WordTok's too)
INF = float("inf")


# ---- the logits transform -------------------------------------------------------------------

def test_repetition_penalty_divides_positive_logits_and_multiplies_the_rest_over_prompt_and_output():
    logits = torch.tensor([[2.0, -1.0, 0.5, 4.0, -3.0, 0.0]])
    out = penalize(logits, [3, 3], SamplingParams(repetition_penalty=2.0), prompt=[0, 1, 5])
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 2.0, -3.0, 0.0]]))  # tokens 0, 1, 3, 5 seen
    below = penalize(logits, [3], SamplingParams(repetition_penalty=0.5), prompt=[1])  # < 1 favours repeats
    assert torch.equal(below, torch.tensor([[2.0, -0.5, 0.5, 8.0, -3.0, 0.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 4.0, -3.0, 0.0]]))  # the input is left alone


def test_vllms_order_bias_then_repetition_then_frequency_and_presence():
    logits = torch.tensor([[1.0, 3.0, 0.0]])
    p = SamplingParams(logit_bias={0: -2.0}, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = penalize(logits, [0, 0, 1], p)
    # token 0: (1 - 2) * 2 - 2 * 0.5 - 0.25; token 1: 3 / 2 - 0.5 - 0.25; token 2: untouched
    assert torch.equal(out, torch.tensor([[-3.25, 0.75, 0.0]]))


def test_min_tokens_rules_out_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(1, 8)
    p = SamplingParams(max_new_tokens=5, min_tokens=2, stop_token_ids=(6,))
    early = penalize(logits, [4], p, eos={EOS})
    assert early[0, EOS] == -INF and early[0, 6] == -INF and torch.isfinite(early[0, [0, 1, 3, 4, 5, 7]]).all()
    assert torch.equal(penalize(logits, [4, 5], p, eos={EOS}), logits)  # two tokens out: nothing ruled out


def test_allowed_token_ids_bad_words_and_a_grammar_mask():
    logits = torch.arange(8.0).view(1, 8)
    out = penalize(logits, [], SamplingParams(allowed_token_ids=(1, 3, 6)))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True, False, False, True, False]
    words = SamplingParams(bad_words_ids=((7,), (4, 5)))
    assert penalize(logits, [], words)[0].isinf().nonzero().flatten().tolist() == [7]  # 5 only after 4
    assert penalize(logits, [1, 4], words)[0].isinf().nonzero().flatten().tolist() == [5, 7]
    grammar = torch.tensor([True, False, True, True, False])  # a tokenizer of 5 tokens, a model of 8 logits
    kept = penalize(logits, [], SamplingParams(), allowed=grammar)[0].isfinite()
    assert kept.nonzero().flatten().tolist() == [0, 2, 3]


def test_min_p_drops_tokens_below_its_share_of_the_likeliest():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    p = SamplingParams(temperature=1.0, min_p=0.2)  # threshold 0.1: token 3 never, the others sometimes
    gen = torch.Generator().manual_seed(0)
    drawn = [int(pick_next(probs.log(), p, gen)[0]) for _ in range(400)]
    assert set(drawn) == {0, 1, 2}
    one = SamplingParams(temperature=1.0, min_p=1.0)  # only the likeliest: greedy in all but name
    assert {int(pick_next(probs.log(), one, gen)[0]) for _ in range(50)} == {0}


def test_validation_follows_vllm():
    for bad in (dict(repetition_penalty=0.0), dict(repetition_penalty=float("nan")), dict(min_p=1.5),
                dict(min_tokens=9, max_new_tokens=8), dict(min_tokens=-1), dict(logit_bias={3: 101.0}),
                dict(stop_token_ids=(-1,)), dict(allowed_token_ids=()), dict(bad_words_ids=((),))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(repetition_penalty=7.5).repetition_penalty == 7.5  # vLLM sets no upper bound


def test_stop_strings_cut_with_or_without_the_stop_string():
    assert cut_at_stop("ab STOP cd", ["STOP", "cd"]) == ("ab ", True)
    assert cut_at_stop("ab STOP cd", ["STOP", "cd"], include=True) == ("ab STOP", True)
    assert cut_at_stop("ab ST", ["STOP"], include=True) == ("ab ST", False)


def test_bad_words_are_tokenized_bare_and_after_a_space():
    from transformers import AutoTokenizer  # noqa: F401  (the tiny word tokenizer is a PreTrainedTokenizerFast)
    from tiny_tokenizer import tiny_tokenizer, word_id

    tok = tiny_tokenizer()
    assert bad_words_ids(tok, ["ba be", " ka"]) == ((word_id("ba"), word_id("be")), (word_id("ka"),))


def test_the_plain_loop_honours_them_too():
    """generate_ids (the Python API's loop) applies the same transform row by row."""
    model = tiny_model("llama")
    ids = torch.tensor([ROWS[2]])
    mask = torch.ones_like(ids)
    plain = generate_ids(model, ids, mask, [None], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    stop = generate_ids(model, ids, mask, [None], SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                                 stop_token_ids=(plain[2],)))[0]
    assert stop == plain[:plain.index(plain[2]) + 1]
    pen = generate_ids(model, ids, mask, [None], SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                                repetition_penalty=3.0))[0]
    engine = Engine(model, WordTok())
    same = engine.generate([Request(prompt=text(ROWS[2]), max_new_tokens=6, ignore_eos=True,
                                    repetition_penalty=3.0)])[0]
    assert pen == same.token_ids


# ---- the engine: each field changes the tokens as vLLM's does, per row ---------------------------

@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_engine_picks_the_argmax_of_the_repetition_penalized_logits(model):
    engine = Engine(model, WordTok(), keep_logits=True)
    prompt = ROWS[0]
    plain, pen = engine.generate([Request(prompt=text(prompt), max_new_tokens=10, ignore_eos=True),
                                  Request(prompt=text(prompt), max_new_tokens=10, ignore_eos=True,
                                          repetition_penalty=4.0)])
    assert pen.token_ids != plain.token_ids
    p = SamplingParams(repetition_penalty=4.0)
    for t, raw in enumerate(pen.logits):  # each step: the argmax of the raw logits, penalized over prompt + output
        want = penalize(raw[None], pen.token_ids[:t], p, prompt=prompt)
        assert int(want.argmax()) == pen.token_ids[t]
        assert want[0, prompt[0]] != raw[prompt[0]]  # the prompt's own tokens are penalized too


def test_min_tokens_holds_off_an_eos_the_model_would_pick_at_once(model):
    engine = Engine(model, WordTok())
    force = {EOS: 100.0}  # EOS the likeliest token at every step
    now, later = engine.generate([Request(prompt=text(ROWS[1]), max_new_tokens=12, logit_bias=force),
                                  Request(prompt=text(ROWS[1]), max_new_tokens=12, logit_bias=force, min_tokens=5)])
    assert now.token_ids == [EOS] and now.finish_reason == "stop" and now.text == ""
    assert len(later.token_ids) == 6 and later.token_ids[-1] == EOS and EOS not in later.token_ids[:5]
    assert later.finish_reason == "stop"


def test_min_tokens_holds_off_stop_strings_and_stop_token_ids(model):
    engine = Engine(model, WordTok())
    full = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=8, ignore_eos=True)])[0].token_ids
    first = f" {full[0]}"
    early = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=8, ignore_eos=True, stop=[first])])[0]
    assert early.text == "" and early.finish_reason == "stop"
    held = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=8, ignore_eos=True, stop=[first],
                                    min_tokens=3)])[0]
    assert len(held.token_ids) >= 3 and held.text.startswith(WordTok().decode(full[:3]))  # no cut before token 3
    tok_held = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=8, ignore_eos=True,
                                        stop_token_ids=[full[0]], min_tokens=3)])[0]
    assert full[0] not in tok_held.token_ids[:3]  # ruled out of the first three tokens


def test_stop_token_ids_end_the_row_keeping_the_token(model):
    engine = Engine(model, WordTok(), max_batch_size=4)
    full = engine.generate([Request(prompt=text(ROWS[2]), max_new_tokens=8, ignore_eos=True)])[0].token_ids
    k = next(i for i, t in enumerate(full) if i >= 2 and t not in full[:i])  # a token first seen at step >= 2
    other = Request(prompt=text(ROWS[0]), max_new_tokens=8, ignore_eos=True)
    stopped, neighbour = engine.generate([Request(prompt=text(ROWS[2]), max_new_tokens=8, ignore_eos=True,
                                                  stop_token_ids=[full[k]]), other])
    assert stopped.token_ids == full[:k + 1] and stopped.finish_reason == "stop"
    assert neighbour.finish_reason == "length" and len(neighbour.token_ids) == 8  # the other row goes on


def test_include_stop_str_in_output_keeps_it_and_streams_it(model):
    engine = Engine(model, WordTok())
    full = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=6, ignore_eos=True)])[0].token_ids
    stop = f" {full[3]}"
    req = dict(prompt=text(ROWS[0]), max_new_tokens=6, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    out = engine.generate([Request(**req)])[0]
    whole = WordTok().decode(full)
    assert out.text == whole[: whole.index(stop) + len(stop)] and out.finish_reason == "stop"
    assert "".join(e.text for e in engine.stream(Request(**req))) == out.text


def test_allowed_token_ids_and_bad_words(model):
    engine = Engine(model, WordTok())
    allowed = [7, 11, 13]
    out = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=10, allowed_token_ids=allowed)])[0]
    assert set(out.token_ids) <= set(allowed) and len(out.token_ids) == 10
    full = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=10, ignore_eos=True)])[0].token_ids
    banned = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=10, ignore_eos=True,
                                      bad_words=[str(full[1])])])[0]
    assert full[1] not in banned.token_ids and banned.token_ids[0] == full[0]


def test_min_p_of_one_samples_the_greedy_tokens(model):
    engine = Engine(model, WordTok())
    greedy, sampled = engine.generate([
        Request(prompt=text(ROWS[1]), max_new_tokens=8, ignore_eos=True),
        Request(prompt=text(ROWS[1]), max_new_tokens=8, ignore_eos=True, temperature=1.5, min_p=1.0, seed=3)])
    assert sampled.token_ids == greedy.token_ids


def test_each_rows_fields_stay_its_own_in_a_mixed_batch(model):
    """Rows of different tasks, each with its own sampling fields (seeded sampling included), give
    what each gives alone."""
    tasks = make_tasks(model, 3)
    reqs = [dict(prompt=text(ROWS[0]), task="task0", max_new_tokens=7, repetition_penalty=1.8, ignore_eos=True),
            dict(prompt=text(ROWS[1]), task="task1", max_new_tokens=6, temperature=1.0, seed=11, min_p=0.1,
                 ignore_eos=True),
            dict(prompt=text(ROWS[2]), max_new_tokens=7, logit_bias={9: 5.0}, bad_words=["9"], min_tokens=2),
            dict(prompt=text(ROWS[0]), task="task2", max_new_tokens=5, temperature=0.7, top_k=5, seed=5,
                 stop_token_ids=[3], ignore_eos=True),
            dict(prompt=text(ROWS[1]), max_new_tokens=6, ignore_eos=True)]
    alone = [Engine(model, WordTok(), tasks).generate([Request(**r)])[0] for r in reqs]
    together = Engine(model, WordTok(), tasks, max_batch_size=8).generate([Request(**r) for r in reqs])
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert 9 not in together[2].token_ids


def test_seeded_rows_are_reproducible_whatever_the_batch(model):
    engine = Engine(model, WordTok(), max_batch_size=8)
    req = dict(prompt=text(ROWS[0]), max_new_tokens=8, temperature=1.2, seed=42, ignore_eos=True, min_p=0.05)
    solo = engine.generate([Request(**req)])[0].token_ids
    crowd = engine.generate([Request(prompt=text(ROWS[1]), max_new_tokens=9, temperature=1.0, seed=1),
                             Request(prompt=text(ROWS[2]), max_new_tokens=3, temperature=1.0), Request(**req)])
    assert crowd[2].token_ids == solo
    other = engine.generate([Request(**dict(req, seed=43))])[0].token_ids
    assert other != solo  # the seed is what fixes them


def test_the_engine_refuses_token_ids_outside_the_vocabulary(model):
    engine = Engine(model, WordTok())
    for bad in (dict(stop_token_ids=[96]), dict(allowed_token_ids=[0, 500]), dict(logit_bias={96: 1.0}),
                dict(bad_words=[" "]), dict(min_tokens=40)):
        out = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=8, **bad)])[0]
        assert out.finish_reason == "error" and out.error_code == "bad_request", bad


# ---- over HTTP ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(model):
    from tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    engine = Engine(model, tok, make_tasks(model, 2)).start()
    c = TestClient(create_app(engine, config=ServerConfig(base_model_id="base")))
    yield c, engine
    engine.stop()


def _post(client, path="/v1/completions", **body):
    base = {"model": "base", "prompt": "ba be bi"} if path == "/v1/completions" else \
        {"model": "base", "messages": [{"role": "user", "content": "ba be"}]}
    return client.post(path, json={**base, "max_tokens": 8, "temperature": 0, **body})


def test_http_fields_change_the_output_as_in_the_engine(client):
    c, engine = client
    plain = _post(c, prompt="ka ke ki ko").json()["choices"][0]  # "to ha ha ...": a repeat to penalize
    for r in (5.0, 0.2):
        pen = _post(c, prompt="ka ke ki ko", repetition_penalty=r).json()["choices"][0]
        ref = engine.generate([Request(prompt="ka ke ki ko", max_new_tokens=8, repetition_penalty=r)])[0]
        assert pen["text"] == ref.text and pen["text"] != plain["text"]
    now = _post(c, logit_bias={"2": 100}).json()
    later = _post(c, logit_bias={"2": 100}, min_tokens=4).json()
    assert now["usage"]["completion_tokens"] == 1 and now["choices"][0]["finish_reason"] == "stop"
    assert later["usage"]["completion_tokens"] == 5 and later["choices"][0]["finish_reason"] == "stop"
    full = engine.generate([Request(prompt="ba be bi", max_new_tokens=8, ignore_eos=True)])[0]
    k = next(i for i, t in enumerate(full.token_ids) if i >= 1 and t not in full.token_ids[:i])
    stopped = _post(c, stop_token_ids=[full.token_ids[k]], ignore_eos=True).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == k + 1
    chat = _post(c, "/v1/chat/completions", min_tokens=3, logit_bias={"2": 100}).json()
    assert chat["usage"]["completion_tokens"] == 4 and chat["choices"][0]["finish_reason"] == "stop"
    sampled = [_post(c, temperature=1.0, seed=9, min_p=0.05, n=2).json() for _ in range(2)]
    assert sampled[0]["choices"] == sampled[1]["choices"]  # seeded: reproducible, choice i with seed + i
    r = _post(c, request_id="abc-123")
    assert r.json()["id"] == "cmpl-abc-123"


def _refused(r, param, message=None):
    err = r.json().get("error", {})
    assert r.status_code == 400 and err.get("param") == param, (param, r.status_code, r.text)
    assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
    if message is not None:
        assert err["message"] == message, err["message"]


def test_unknown_fields_are_refused_as_openai_refuses_them(client):
    c, _ = client
    _refused(_post(c, frobnicate=1), "frobnicate", "Unrecognized request argument supplied: frobnicate")
    _refused(_post(c, "/v1/chat/completions", temperatur=0.5), "temperatur",
             "Unrecognized request argument supplied: temperatur")
    _refused(_post(c, stream=True, stream_options={"include_usage": True, "extra": 1}), "stream_options.extra")
    _refused(_post(c, structured_outputs={"regex": "[ab]", "backend": "x"}), "structured_outputs.backend")


def test_vllm_fields_we_lack_are_refused_unless_they_ask_for_nothing(client):
    c, _ = client
    both = {"use_beam_search": (False, True), "length_penalty": (1.0, 0.5), "skip_special_tokens": (True, False),
            "truncate_prompt_tokens": (None, 5), "prompt_logprobs": (None, 1), "priority": (0, 3),
            "logits_processors": (None, ["x"]), "guided_decoding_backend": ("guidance", "xgrammar"),
            "return_tokens_as_token_ids": (False, True), "vllm_xargs": ({}, {"a": 1}),
            "thinking_token_budget": (-1, 10), "kv_transfer_params": (None, {"a": 1})}
    chat = {"chat_template": (None, "{{x}}"), "chat_template_kwargs": ({}, {"enable_thinking": False}),
            "add_generation_prompt": (True, False), "continue_final_message": (False, True),
            "documents": (None, [{"text": "x"}]), "mm_processor_kwargs": (None, {"a": 1}), "echo": (False, True)}
    for path, fields in (("/v1/completions", both), ("/v1/chat/completions", {**both, **chat})):
        for name, (nothing, something) in fields.items():
            assert _post(c, path, **{name: nothing}).status_code == 200, (path, name)
            _refused(_post(c, path, **{name: something}), name)
    labels = dict(user="u", session_id="s", cache_salt="salt", safety_identifier="x", prompt_cache_key="k")
    assert _post(c, **labels).json()["choices"][0]["text"] == _post(c).json()["choices"][0]["text"]


def test_bad_values_are_400s_naming_the_field(client):
    c, engine = client
    for body, param in [({"min_tokens": 9}, "min_tokens"),  # over max_tokens (8)
                        ({"stop_token_ids": [96]}, "stop_token_ids"),
                        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
                        ({"logit_bias": {"96": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                        ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"²": 1}}, "logit_bias"),
                        ({"bad_words": ["  "]}, "bad_words")]:
        _refused(_post(c, **body), param)
    for body in ({"repetition_penalty": 0}, {"min_p": 1.5}):
        r = _post(c, **body)
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == next(iter(body))
    assert engine.running  # nothing a client sent stopped the loop


def test_the_seq2seq_engine_honours_them_per_row():
    from test_seq2seq_serve import tiny_t5
    from tiny_tokenizer import tiny_tokenizer

    from softprompt.serve.seq2seq import Seq2SeqEngine

    engine = Seq2SeqEngine(tiny_t5(), tiny_tokenizer(), max_batch_size=8)
    prompt = "ba be bi bo"
    full = engine.generate([Request(prompt=prompt, max_new_tokens=8, ignore_eos=True)])[0].token_ids
    k = next(i for i, t in enumerate(full) if i >= 1 and t not in full[:i])
    reqs = [dict(prompt=prompt, max_new_tokens=12, logit_bias={EOS: 100.0}, min_tokens=4),
            dict(prompt=prompt, max_new_tokens=8, ignore_eos=True, stop_token_ids=[full[k]]),
            dict(prompt=prompt, max_new_tokens=8, ignore_eos=True, repetition_penalty=0.1),
            dict(prompt="ca ce", max_new_tokens=6, temperature=1.0, seed=4, min_p=0.2, ignore_eos=True),
            dict(prompt=prompt, max_new_tokens=8, ignore_eos=True)]
    alone = [engine.generate([Request(**r)])[0] for r in reqs]
    together = engine.generate([Request(**r) for r in reqs])
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    held, stopped, repeated, _, plain = together
    assert len(held.token_ids) == 5 and held.token_ids[-1] == EOS and held.finish_reason == "stop"
    assert stopped.token_ids == full[:k + 1] and stopped.finish_reason == "stop"
    assert plain.token_ids == full and repeated.token_ids != full  # output tokens only: < 1 favours its repeats
    assert len(set(repeated.token_ids)) < len(set(full))


def test_the_seq2seq_python_loop_applies_them_as_its_engine_does():
    """sp.generate on an encoder-decoder base (families/seq2seq/generate.py) processes logits with
    the same `penalize`: the same tokens as the seq2seq engine for each field."""
    from test_seq2seq_serve import tiny_t5
    from tiny_tokenizer import tiny_tokenizer

    from softprompt.families.seq2seq.generate import generate_ids as seq2seq_ids
    from softprompt.loops.generate import SamplingParams
    from softprompt.serve.seq2seq import Seq2SeqEngine

    model, tok = tiny_t5(), tiny_tokenizer()
    engine = Seq2SeqEngine(model, tok, max_batch_size=8)
    prompt = "ba be bi bo"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    for fields in (dict(repetition_penalty=0.1, ignore_eos=True), dict(logit_bias={EOS: 100.0}, min_tokens=4),
                   dict(frequency_penalty=1.5, presence_penalty=0.5, ignore_eos=True)):
        want = engine.generate([Request(prompt=prompt, max_new_tokens=8, **fields)])[0].token_ids
        params = SamplingParams(max_new_tokens=8, **{k: tuple(v.items()) if k == "logit_bias" else v
                                                     for k, v in fields.items()})
        got = seq2seq_ids(model, ids, torch.ones_like(ids), [None], params, {EOS})[0]
        assert got == want, fields
