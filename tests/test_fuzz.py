"""Property-based fuzzing (Hypothesis) of what clients and artifact authors control: sampling
parameters and logits, prompts (any Unicode, lone surrogates, control characters), cards (any JSON)
and store names. The property is always the same: a clean refusal of the documented kind, or a
result; never another exception, and the engine still generates afterwards.

Budget: SOFTPROMPT_FUZZ_EXAMPLES examples per property (default 40: seconds on two slow cores in
the normal test command); a nightly run can raise it. The database is off, so runs are reproducible
from the seed Hypothesis prints on failure."""

import json
import math
import os

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.io.artifact import ArtifactError, load_artifact, read_card, save_artifact
from softprompt.loops.generate import SamplingParams, pick_next
from softprompt.serve import Engine, Request
from softprompt.store.core import Store, StoreError, check_name, parse_ref

FUZZ = settings(max_examples=int(os.environ.get("SOFTPROMPT_FUZZ_EXAMPLES", "40")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# Any code point, lone surrogates (a JSON "\ud800" escape) and control characters included.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama"), tiny_tokenizer()


def one_line_error(e: Exception) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


# ---- sampling ------------------------------------------------------------------------------------------

LOGIT = st.floats(allow_nan=True, allow_infinity=True, width=32)


@FUZZ
@given(rows=st.integers(1, 3), vocab=st.integers(1, 8), data=st.data(),
       temperature=st.floats(0, 2) | st.sampled_from([1e-40, 5e-324, 1e-4, 1e-5]),
       top_p=st.floats(0, 1, exclude_min=True) | st.sampled_from([1e-300, 1.0]), top_k=st.integers(0, 10),
       seed=st.integers(0, 2**62))
def test_pick_next_gives_a_token_of_the_vocabulary_for_any_logits_and_legal_params(
        rows, vocab, data, temperature, top_p, top_k, seed):
    logits = torch.tensor(data.draw(st.lists(st.lists(LOGIT, min_size=vocab, max_size=vocab), min_size=rows,
                                             max_size=rows)))
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    out = pick_next(logits, params, torch.Generator().manual_seed(seed))
    assert out.shape == (rows,) and all(0 <= int(t) < vocab for t in out)
    for i in range(rows):  # a finite row: the pick is one of its best when greedy, never a nan/-inf slot
        row = logits[i]
        if params.greedy and torch.isfinite(row).all():
            assert row[out[i]] == row.max()
        if torch.isfinite(row).any() and not torch.isposinf(row).any():
            assert torch.isfinite(row[out[i]])


@FUZZ
@given(max_new_tokens=JSON, temperature=JSON, top_k=JSON, top_p=JSON, stop=JSON)
def test_sampling_params_are_either_valid_or_a_value_error(max_new_tokens, temperature, top_k, top_p, stop):
    try:
        p = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           stop=stop)
    except (ValueError, TypeError) as e:  # TypeError: a non-number compared with a number (no engine sees it)
        one_line_error(e)
        return
    assert p.max_new_tokens >= 0 and math.isfinite(p.temperature) and 0 < p.top_p <= 1


# ---- prompts through the engine --------------------------------------------------------------------

@FUZZ
@given(prompt=ANY_TEXT, temperature=st.sampled_from([0.0, 1e-40, 0.7, 2.0]), stop=st.lists(ANY_TEXT, max_size=2))
def test_any_prompt_ends_in_a_completion_or_a_clean_refusal(llama, prompt, temperature, stop):
    model, tok = llama
    engine = Engine(model, tok)
    req = Request(prompt=prompt, max_new_tokens=2, temperature=temperature, stop=stop, seed=0)
    out = engine.generate([req, Request(prompt="ba be", max_new_tokens=2)])
    assert out[0].finish_reason in ("length", "stop", "error")
    if out[0].finish_reason == "error":
        assert out[0].error_code in ("invalid_text", "bad_request"), out[0]
        one_line_error(Exception(out[0].error))
    assert out[1].finish_reason in ("length", "stop") and out[1].token_ids  # the row beside it was untouched


@FUZZ
@given(ids=st.lists(st.integers(-2**70, 2**70) | st.booleans(), max_size=5))
def test_any_prompt_ids_end_in_a_completion_or_a_clean_refusal(llama, ids):
    model, tok = llama
    out = Engine(model, tok).generate([Request(prompt_ids=ids, max_new_tokens=1)])[0]
    ok = ids and all(not isinstance(i, bool) and 0 <= i < model.config.vocab_size for i in ids)
    assert (out.finish_reason != "error") == bool(ok), out


# ---- cards ----------------------------------------------------------------------------------------------

CARD_FIELDS = ["format", "format_version", "method", "model_family", "num_virtual_tokens", "config", "tensors",
               "dtype", "base_model", "library_version", "created", "metrics", "dataset", "tensor_sha256",
               "bytes", "plot", "inspection", "classifier", "task"]


@pytest.fixture(scope="module")
def good_artifact(llama, tmp_path_factory):
    model, _ = llama
    d = tmp_path_factory.mktemp("card")
    art = save_artifact(methods.create("prefix_tuning", model, num_virtual_tokens=2, projection_dim=0), d / "art",
                        model)
    return art, json.loads((art / "card.json").read_text())


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(CARD_FIELDS) | ANY_TEXT, JSON, min_size=1, max_size=3),
       drop=st.lists(st.sampled_from(CARD_FIELDS), max_size=2))
def test_any_card_is_read_loaded_added_and_served_or_refused_in_one_line(llama, good_artifact, tmp_path_factory,
                                                                         edits, drop):
    model, tok = llama
    art, card = good_artifact
    card = {k: v for k, v in card.items() if k not in drop} | edits
    d = tmp_path_factory.mktemp("fuzzcard")
    bad = d / "art"
    bad.mkdir()
    (bad / "adapter.safetensors").write_bytes((art / "adapter.safetensors").read_bytes())
    try:
        text = json.dumps(card)
    except ValueError:  # keys that JSON cannot hold
        assume(False)
    (bad / "card.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    for read in (read_card, lambda p: load_artifact(p, model), lambda p: Store(d / "store").add("t", p)):
        try:
            read(bad)
        except ArtifactError as e:
            one_line_error(e)
    out = Engine(model, tok, {"t": str(bad)}).generate([Request(prompt="ba", task="t", max_new_tokens=1),
                                                       Request(prompt="ba", max_new_tokens=1)])
    assert out[0].finish_reason != "error" or out[0].error_code == "task_refused", out[0]
    assert out[1].finish_reason in ("length", "stop")


@FUZZ
@given(card=JSON)
def test_a_card_that_is_not_even_an_object_is_refused(tmp_path_factory, good_artifact, card):
    art, _ = good_artifact
    bad = tmp_path_factory.mktemp("notobj") / "art"
    bad.mkdir()
    (bad / "adapter.safetensors").write_bytes((art / "adapter.safetensors").read_bytes())
    (bad / "card.json").write_text(json.dumps(card), encoding="utf-8", errors="surrogatepass")
    with pytest.raises(ArtifactError) as e:
        read_card(bad)
    one_line_error(e.value)


# ---- store names ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(llama, tmp_path_factory):
    model, _ = llama
    s = Store(tmp_path_factory.mktemp("names") / "store")
    s.add("known", methods.create("prompt_tuning", model, num_virtual_tokens=2, init="random"), model)
    return s


REFS = ANY_TEXT | st.builds(lambda n, v: f"{n}@{v}", st.sampled_from(["known", "x", ""]),
                            st.integers(-2**80, 2**80) | ANY_TEXT)


@FUZZ
@given(ref=REFS)
def test_any_store_name_is_found_or_refused_with_a_store_error(store, ref):
    removable = not ref.split("@")[0] == "known"
    for call in (check_name, parse_ref, store.show, store.resolve, store.entry, store.rm if removable else repr):
        try:
            call(ref)
        except StoreError as e:
            one_line_error(e)
    with pytest.raises(StoreError) as e:  # an existing destination is refused, whatever the name
        store.export(ref, store.root / "objects")
    one_line_error(e.value)
    assert store.show("known")["file_ok"]
