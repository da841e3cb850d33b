"""The boundary with transformers: only softprompt/hf/ touches caches, cache keywords or layer
hooks; a prefix a model silently ignores is caught; the keyword is read from the signature."""

import ast
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from softprompt import hf
from softprompt.hf.prefix import check_prefix_support, prefixed_forward

PACKAGE = Path(__file__).resolve().parents[1] / "softprompt"

# What only the boundary may write: cache classes and keywords, cache internals, layer hooks.
FORBIDDEN = [
    r"\bpast_key_values\b", r"\bcache_utils\b", r"\bDynamicCache\b", r"\bEncoderDecoderCache\b",
    r"\bDynamicLayer\b", r"register_forward(_pre)?_hook", r"\.forward\s*=", r"GradientCheckpointingLayer",
    r"\bself_attention_cache\b", r"\bcross_attention_cache\b", r"\.layers\[", r"\breorder_cache\b",
    r"\bbatch_repeat_interleave\b", r"\bget_seq_length\b", r"set_attn_implementation",
]


def _code_lines(path: Path):
    """Source lines without comments and docstrings (which may name these things)."""
    src = path.read_text()
    doc_lines = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    for i, line in enumerate(src.splitlines(), 1):
        if i not in doc_lines:
            yield i, line.split("#", 1)[0]


def test_only_the_boundary_touches_transformers_internals():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "hf" and path.parent.parent == PACKAGE:
            continue
        for i, code in _code_lines(path):
            for pattern in FORBIDDEN:
                if re.search(pattern, code):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {code.strip()}")
    assert not offenders, "outside softprompt/hf/:\n" + "\n".join(offenders)


def test_the_lint_sees_a_forbidden_line(tmp_path):
    # The rule itself must bite: a file that passes a cache keyword is flagged, a docstring is not.
    f = tmp_path / "x.py"
    f.write_text('"""past_key_values in a docstring is fine."""\nmodel(past_key_values=c)  # and a comment\n')
    hits = [i for i, code in _code_lines(f) for p in FORBIDDEN if re.search(p, code)]
    assert hits == [2]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_keyword_is_read_from_the_signature(arch):
    import inspect

    model = tiny_model(arch)
    params = inspect.signature(type(model).forward).parameters
    assert hf.keyword(model) in params and hf.keyword(model) in hf.cache.KEYWORDS


def test_self_check_passes_on_supported_models(arch):
    check_prefix_support(tiny_model(arch))  # raises if not honoured


def test_silently_dropped_prefix_is_caught():
    """A release that accepts the cache and ignores it (simulated: a Llama whose forward drops the
    cache and the mask over it) must fail loudly at the first prefixed call: without the check it
    would generate the bare model's text."""
    from transformers import LlamaForCausalLM

    class IgnoresPrefix(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
            if attention_mask is not None and input_ids is not None:
                attention_mask = attention_mask[:, -input_ids.shape[1]:]
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    real = tiny_model("llama")
    model = IgnoresPrefix(real.config).eval()
    model.load_state_dict(real.state_dict())
    kv = torch.randn(2, 2, 2, 3, 8)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(hf.PrefixIgnored, match="ignores the KV prefix"):
        prefixed_forward(model, ids, mask, [kv])
    with pytest.raises(hf.PrefixIgnored):  # and again: a failed check is not remembered as passed
        prefixed_forward(model, ids, mask, [kv])


def test_misspelled_keyword_is_caught(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setitem(hf.cache._keyword, type(model), "past_key_value_ignored")
    with pytest.raises(hf.PrefixIgnored, match="self-check"):
        check_prefix_support(model)


def test_misplaced_prefix_is_caught(monkeypatch):
    """Positions off by one (a release that counts positions differently) fail the check too."""
    import softprompt.hf.prefix as prefix

    model = tiny_model("llama")
    real = prefix.positions_after_prefix
    monkeypatch.setattr(prefix, "positions_after_prefix", lambda m, p: real(m, p) + 1)
    with pytest.raises(hf.PrefixIgnored, match="does not honour the KV prefix exactly"):
        check_prefix_support(model)


def test_model_without_a_cache_keyword_is_refused():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(hf.UnsupportedModel, match="takes no cache"):
        hf.keyword(NoCache())


def test_our_calls_raise_no_deprecation_warnings():
    """Every path that passes a cache (prefill, decoding, the engine's merge and compaction, beam
    search, training with checkpointing, seq2seq generation with all three prefixes, an encoder with
    a deep prompt) warns of nothing deprecated on the installed release: transformers 5.24 warns of
    `past_key_values` on every call that still uses the old keyword."""
    import warnings

    from test_classify import tiny_bert
    from test_engine import WordTok, make_tasks, text
    from test_seq2seq import tiny as tiny_seq2seq

    from softprompt.families.encoder import encode
    from softprompt.families.seq2seq.core import Seq2SeqPrefix, seq2seq_geometry
    from softprompt.families.seq2seq.generate import generate_ids as seq2seq_generate_ids
    from softprompt.loops.evaluate import beam_search
    from softprompt.loops.generate import SamplingParams, generate_ids
    from softprompt.serve import Engine, Request

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = tiny_model("llama")
        tasks = make_tasks(model)
        kv = tasks["prefix_tuning-3"].to_kv_prefix(model)
        generate_ids(model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), [kv],
                     SamplingParams(max_new_tokens=3))
        Engine(model, WordTok(), tasks).generate([Request(prompt=text([5, 6, 7 + i]), task=t, max_new_tokens=3)
                                                  for i, t in enumerate(tasks)])

        class Tok(WordTok):
            def __call__(self, text, add_special_tokens=False):
                return {"input_ids": [int(x) for x in text.split()]}

        beam_search(model, Tok(), "5 6 7", kv, num_beams=2, max_new_tokens=3)
        prompt = tasks["prefix_tuning-3"]
        with hf.gradient_checkpointing(model):
            ids = torch.tensor([[5, 6, 7, 8]])
            prompt(model, ids, torch.ones_like(ids)).logits.sum().backward()

        t5 = tiny_seq2seq("t5")
        geo, g = seq2seq_geometry(t5), torch.Generator().manual_seed(0)
        parts = {p: torch.randn(geo.part_shape(p, 2), generator=g) for p in ("encoder", "decoder", "cross")}
        seq2seq_generate_ids(t5, torch.tensor([[5, 6, 1]]), torch.ones(1, 3, dtype=torch.long), [Seq2SeqPrefix(**parts)],
                             SamplingParams(max_new_tokens=3))
        bert = tiny_bert()
        bkv = torch.randn(2, 2, 4, 3, 8, generator=g)
        encode(bert, torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long), prefix=bkv)
    deprecated = [f"{w.category.__name__}: {w.message}" for w in seen
                  if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecated, deprecated


# Modules that belong to one family (or to classification, a task built on encoders), and the
# boundary itself; everything else is generic and must go through softprompt.families.
FAMILY_OWNED = ("families/", "serve/seq2seq.py", "serve/engines.py", "classify/", "serve/classify.py",
                "io/classifier.py", "runs/classify.py", "hf/")
FAMILY_NAMES = [r"^\s*(from|import)\s+\S*\b(seq2seq|encoder|families\.(causal|seq2seq|encoder))\b",
                r"\bis_seq2seq\(", r"[\"']seq2seq[\"']", r"\bSeq2Seq\w*"]


def test_generic_modules_never_name_a_family():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(FAMILY_OWNED):
            continue
        for i, code in _code_lines(path):
            if any(re.search(p, code) for p in FAMILY_NAMES):
                offenders.append(f"softprompt/{rel}:{i}: {code.strip()}")
    assert not offenders, "generic modules naming a family (use softprompt.families.family_of):\n" + "\n".join(offenders)


def test_family_is_chosen_from_the_config():
    from transformers import BertConfig, T5Config

    from softprompt.families import family_of

    assert family_of(tiny_model("llama")).name == "causal_lm"
    assert family_of(T5Config()).name == "seq2seq"
    assert family_of(BertConfig()).name == "encoder"
    with pytest.raises(ValueError, match="do not generate text"):
        family_of(BertConfig()).generate(None, None, ["x"], None, None)
