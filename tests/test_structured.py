"""Structured outputs (softprompt/serve/structured.py, llguidance): even a random tiny model's output
parses and follows the constraint (a JSON schema, a regex, a choice, a grammar), the mask is that
row's alone (an unconstrained row in the same batch gets what it gets alone), a row ends when its
grammar is complete, and a bad schema, regex or grammar is a 400 naming its field. The tiny models
here speak bytes: a byte-level BPE tokenizer made on the spot (the 256 bytes, a few merges and
three specials), as real models' tokenizers are."""

import json
import re

import jsonschema
import pytest
import torch
from starlette.testclient import TestClient
from test_http import make_tasks
from tiny_tokenizer import tiny_tokenizer

from softprompt.serve import Engine, Request
from softprompt.serve.http import ServerConfig, create_app
from softprompt.serve.seq2seq import Seq2SeqEngine
from softprompt.serve.structured import Constraint, Grammars, StructuredError, closed_objects

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "role"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 99},
                         "ok": {"type": "boolean"}, "role": {"enum": ["admin", "user"]}}}
REGEX = r"[a-z]{3}-[0-9]{2,4}"
CHOICES = ["red", "green", "blue", "dark red"]
LARK = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/'


def byte_tokenizer():
    """A byte-level BPE tokenizer: ids 0-2 are <pad> <s> </s>, 3-258 the 256 bytes (GPT-2's printable
    stand-ins), then a few merges, so that some tokens span several characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + [bytes_to_unicode()[b] for b in range(256)])}
    merges = [('"', ":"), ("Ġ", '"'), ("{", '"'), ("t", "r"), ("tr", "u"), ("tru", "e"), ("r", "e"), ("re", "d")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.padding_side = "left"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return tok


def byte_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).float().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def parts():
    tok = byte_tokenizer()
    model = byte_llama(len(tok) + 3)  # a model with a few more logits than tokens, as many have
    return model, tok, make_tasks(model, 2)


@pytest.fixture(scope="module")
def client(parts):
    model, tok, tasks = parts
    engine = Engine(model, tok, tasks, max_batch_size=8).start()
    c = TestClient(create_app(engine, config=ServerConfig(base_model_id="base")))
    yield c, engine
    engine.stop()


def _complete(c, path="/v1/completions", **body):
    base = {"model": "base", "prompt": "Answer: "} if path == "/v1/completions" else \
        {"model": "base", "messages": [{"role": "user", "content": "Answer in JSON."}]}
    r = c.post(path, json={**base, "max_tokens": 200, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return (choice["text"] if "text" in choice else choice["message"]["content"]), choice["finish_reason"]


# ---- the constraint holds, whatever the model --------------------------------------------------

def test_json_schema_output_parses_and_validates(client):
    c, _ = client
    compact = {"json": SCHEMA, "disable_any_whitespace": True}
    out, reason = _complete(c, structured_outputs=compact)  # greedy
    assert reason == "stop"
    jsonschema.validate(json.loads(out), SCHEMA)
    assert re.fullmatch(r'\{"[^\n\t\r]*\}', out)  # no whitespace between the tokens of the JSON
    assert list(json.loads(out)) == list(SCHEMA["properties"])  # properties in the schema's order
    # OpenAI's response_format (default whitespace, as vLLM's), sampled: still valid, on both endpoints
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for path in ("/v1/completions", "/v1/chat/completions"):
        for seed in (1, 2):
            out, reason = _complete(c, path, response_format=fmt, temperature=1.0, seed=seed)
            assert reason == "stop"
            jsonschema.validate(json.loads(out), SCHEMA)
    # vLLM's older field, the same constraint: the same tokens
    assert _complete(c, guided_json=SCHEMA, temperature=1.0, seed=1) == \
        _complete(c, response_format=fmt, temperature=1.0, seed=1)
    assert _complete(c, guided_json=json.dumps(SCHEMA), temperature=1.0, seed=1) == \
        _complete(c, structured_outputs={"json": SCHEMA}, temperature=1.0, seed=1)


def test_disable_additional_properties_closes_every_object(client):
    c, _ = client
    open_schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                    "b": {"type": "object", "properties": {"c": {"type": "boolean"}}}},
                   "required": ["a", "b"]}
    assert closed_objects(open_schema) == {**open_schema, "additionalProperties": False, "properties": {
        "a": open_schema["properties"]["a"],
        "b": {**open_schema["properties"]["b"], "additionalProperties": False}}}
    for seed in (1, 2, 3):
        so = {"json": open_schema, "disable_any_whitespace": True, "disable_additional_properties": True}
        out, reason = _complete(c, structured_outputs=so, temperature=1.0, seed=seed)
        value = json.loads(out)
        assert reason == "stop" and set(value) == {"a", "b"} and set(value["b"]) <= {"c"}, out


def test_json_object_is_any_json_object(client):
    c, _ = client
    close = {str(i): 8.0 for i in (_id('"'), _id("}"))}  # end strings and objects soon: a random model rambles
    for body in ({"response_format": {"type": "json_object"}},
                 {"structured_outputs": {"json_object": True, "disable_any_whitespace": True}}):
        out, reason = _complete(c, **body, logit_bias=close)
        assert reason == "stop" and isinstance(json.loads(out), dict), out


def _id(char: str) -> int:
    return byte_tokenizer().convert_tokens_to_ids(char)


def test_choice_regex_and_grammar(client):
    c, _ = client
    for seed in (None, 3, 4):
        kw = {} if seed is None else {"temperature": 1.0, "seed": seed}
        out, reason = _complete(c, guided_choice=CHOICES, **kw)
        assert out in CHOICES and reason == "stop"
        out, reason = _complete(c, guided_regex=REGEX, **kw)
        assert re.fullmatch(REGEX, out) and reason == "stop", out
        out, _ = _complete(c, structured_outputs={"regex": REGEX}, **kw)
        assert re.fullmatch(REGEX, out)
        out, reason = _complete(c, guided_grammar=LARK, **kw)
        assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", out) and reason == "stop", out
    gbnf = 'root ::= "yes" | "no"'  # llama.cpp's grammar format is taken too
    assert _complete(c, structured_outputs={"grammar": gbnf})[0] in ("yes", "no")
    out, _ = _complete(c, "/v1/chat/completions", structured_outputs={"choice": CHOICES})
    assert out in CHOICES


def test_a_row_ends_when_its_grammar_is_complete_and_streams_the_same(parts):
    model, tok, _ = parts
    engine = Engine(model, tok)
    choice = Constraint.choice(CHOICES, "guided_choice")
    out = engine.generate([Request(prompt="Answer: ", max_new_tokens=50, structured=choice)])[0]
    assert out.text in CHOICES and out.finish_reason == "stop"
    assert tok.eos_token_id not in out.token_ids  # ended on the last character, no EOS step needed
    assert "".join(e.text for e in engine.stream(Request(prompt="Answer: ", max_new_tokens=50,
                                                         structured=choice))) == out.text
    cut = engine.generate([Request(prompt="Answer: ", max_new_tokens=2, structured=Constraint("regex", REGEX))])[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 2  # out of tokens first: cut short, as in vLLM


# ---- the mask is the row's alone ----------------------------------------------------------------

def test_mixed_batch_constrained_and_free_rows_each_as_alone(parts):
    model, tok, tasks = parts
    reqs = [dict(prompt="Answer: ", max_new_tokens=60, structured=Constraint.json_schema(
                SCHEMA, "x", whitespace_flexible=False)),
            dict(prompt="Tell me", max_new_tokens=12),  # no grammar, no task
            dict(prompt="Code: ", task="task0", max_new_tokens=20, structured=Constraint("regex", REGEX)),
            dict(prompt="Colour? ", task="task1", max_new_tokens=10, temperature=1.0, seed=7,
                 structured=Constraint.choice(CHOICES, "x")),
            dict(prompt="More text", task="task1", max_new_tokens=9, temperature=0.9, seed=2)]
    alone = [Engine(model, tok, tasks).generate([Request(**r)])[0] for r in reqs]
    together = Engine(model, tok, tasks, max_batch_size=8).generate([Request(**r) for r in reqs])
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert together[1].finish_reason == "length" and len(together[1].token_ids) == 12
    jsonschema.validate(json.loads(together[0].text), SCHEMA)
    assert re.fullmatch(REGEX, together[2].text) and together[3].text in CHOICES


def test_a_constraint_the_other_token_limits_leave_no_token_for_ends_that_row_only(parts):
    model, tok, _ = parts
    engine = Engine(model, tok)
    only_x = tok.convert_tokens_to_ids("x")
    bad, good = engine.generate([
        Request(prompt="Answer: ", max_new_tokens=5, structured=Constraint.choice(["red"], "x"),
                allowed_token_ids=[only_x]),
        Request(prompt="Answer: ", max_new_tokens=5)])
    assert bad.finish_reason == "error" and bad.error_code == "bad_request" and "grammar" in bad.error
    assert good.finish_reason == "length"


def test_the_seq2seq_engine_honours_them_too():
    from transformers import T5Config, T5ForConditionalGeneration

    tok = byte_tokenizer()
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, num_heads=4, num_layers=2,
                                             d_ff=64, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
                                             dropout_rate=0.0)).float().eval().requires_grad_(False)
    engine = Seq2SeqEngine(t5, tok)
    outs = engine.generate([Request(prompt="Colour?", max_new_tokens=20, structured=Constraint.choice(CHOICES, "x")),
                            Request(prompt="Code?", max_new_tokens=20, structured=Constraint("regex", REGEX)),
                            Request(prompt="Free", max_new_tokens=6)])
    assert outs[0].text in CHOICES and re.fullmatch(REGEX, outs[1].text)
    assert outs[2].token_ids == engine.generate([Request(prompt="Free", max_new_tokens=6)])[0].token_ids


# ---- refusals: 400s naming the field ------------------------------------------------------------

def test_bad_constraints_are_400s_naming_their_field(client):
    c, engine = client
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
              "response_format.json_schema.schema"),
             ({"guided_regex": "(a"}, "guided_regex"),
             ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs.grammar"),
             ({"guided_json": "{not json"}, "guided_json"),
             ({"guided_choice": []}, "guided_choice"),
             ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),  # two constraints
             ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
             ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
             ({"structured_outputs": {}}, "structured_outputs"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
              "response_format.json_schema"),
             ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
             ({"structured_outputs": {"regex": "a", "structural_tag": "{}"}}, "structured_outputs.structural_tag")]
    for body, param in cases:
        r = c.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 4, **body})
        err = r.json().get("error", {})
        assert r.status_code == 400 and err.get("param") == param, (body, r.text)
    r = c.post("/v1/completions", json={"model": "base", "prompt": "x", "response_format": {"type": "text"}})
    assert r.status_code == 200  # asks for nothing
    assert engine.running


def test_a_tokenizer_the_library_cannot_read_is_a_400():
    from conftest import tiny_model

    tok = tiny_tokenizer()  # word-level, no decoder: llguidance cannot map its tokens to bytes
    engine = Engine(tiny_model("llama"), tok).start()
    try:
        c = TestClient(create_app(engine, config=ServerConfig(base_model_id="base")))
        r = c.post("/v1/completions", json={"model": "base", "prompt": "ba", "guided_choice": ["ba", "be"]})
        assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "structured_outputs"
        assert c.post("/v1/completions", json={"model": "base", "prompt": "ba", "max_tokens": 2}).status_code == 200
    finally:
        engine.stop()


def test_grammars_are_checked_once_and_cached(parts):
    _, tok, _ = parts
    g = Grammars(tok)
    c = Constraint("regex", REGEX, "guided_regex")
    assert g.check(c) is g.check(Constraint("regex", REGEX, "guided_regex"))
    with pytest.raises(StructuredError) as e:
        g.check(Constraint("regex", "[a-", "guided_regex"))
    assert e.value.param == "guided_regex" and e.value.code == "bad_request"
    m = g.matcher(Constraint.choice(["ab", "cd"], "x"))
    allowed = m.allowed()
    assert allowed.dtype == torch.bool and allowed.shape[0] == len(tok)
    first = {tok.convert_ids_to_tokens(i) for i in allowed.nonzero().flatten().tolist()}
    assert first == {"a", "c"}
