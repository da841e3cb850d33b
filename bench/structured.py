"""Structured-output libraries side by side on the embedded model's tokenizer (SmolLM2, 49,152
tokens): xgrammar, llguidance and outlines-core, each for a JSON schema, a regex and a choice.

    python bench/structured.py [--quick]      # --quick: 3 compiles and 2 walks each instead of 10 and 5

For each library and constraint: the one-time tokenizer setup, the grammar compile time (median,
the library's own caches off or bypassed) and the per-token mask time (median over every step of
walking one valid output token by token: compute the next-token mask, check that the next token of
the output is allowed, accept it). One thread throughout (OMP/RAYON_NUM_THREADS=1, xgrammar's
max_threads=1): the server computes one row's mask at a time. A library that is not installed is
skipped and said so. The serving glue (softprompt/serve/structured.py) uses the winner.

`request_ms` is what one request pays: the compile plus the masks of its whole walk. The fourth
constraint, `repeat`, is a bounded repetition (`[A-Za-z ]{2,300}`) as any client may send. Then
`glue_{kind}_mask_us`: what the server pays per token with the winner, llguidance, through
softprompt/serve/structured.py (the mask as a bool tensor over the vocabulary).

Last line: `KEY=VALUE` for each library and constraint: `{lib}_{kind}_compile_ms`,
`{lib}_{kind}_mask_us`, `{lib}_{kind}_request_ms`, `{lib}_setup_s`, and `glue_{kind}_mask_us`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # llguidance's and outlines-core's Rust pools
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import Record, Sections, add_fail_section  # noqa: E402

SCHEMA = {  # a realistic extraction schema: strings, an enum, numbers, an array, a nested object
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "score", "tags", "address", "active"],
}
JSON_TEXT = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "role": "admin",
                        "score": 97.5, "tags": ["math", "engines", "poetry"],
                        "address": {"city": "London", "zip": "W1"}, "active": True}, separators=(",", ":"))
REGEX = r"[A-Z][a-z]{2,12} [A-Z][a-z]{2,12}, born (19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9] in [A-Za-z ]{2,30}\."
REGEX_TEXT = "Grace Hopper, born 1906-12-09 in New York City."
CHOICES = ["positive", "negative", "neutral", "mixed", "not applicable"]
CHOICE_TEXT = "not applicable"
# a bounded repetition, as a client may send: xgrammar expands it into states at compile time
REPEAT = r"[A-Za-z ]{2,300}\."
REPEAT_TEXT = "The quick brown fox jumps over the lazy dog and keeps running far away."
CASES = {"json": (SCHEMA, JSON_TEXT), "regex": (REGEX, REGEX_TEXT), "choice": (CHOICES, CHOICE_TEXT),
         "repeat": (REPEAT, REPEAT_TEXT)}


def regex_escape(s: str) -> str:
    """`s` as a regex matching itself (re.escape also escapes spaces, which xgrammar warns about)."""
    return re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", s)


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab_size: int):
        import xgrammar as xgr

        self.xgr, self.V = xgr, vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, kind, spec):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec))
        if kind == "choice":  # as vLLM gives xgrammar a choice: a grammar of alternatives
            return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))
        return self.compiler.compile_regex(spec)

    def walk(self, grammar, ids):
        m, mask = self.xgr.GrammarMatcher(grammar), self.xgr.allocate_token_bitmask(1, self.V)
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            yield time.perf_counter() - t0, bool((int(mask[0, t // 32]) >> (t % 32)) & 1)
            assert m.accept_token(t)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab_size: int):
        import llguidance
        import llguidance.hf  # not llguidance.torch: its import compiles a kernel with torch.compile (seconds)

        self.llg, self.V = llguidance, vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size)

    def compile(self, kind, spec):
        M = self.llg.LLMatcher
        if kind == "json":
            grammar = M.grammar_from_json_schema(spec)
        elif kind == "choice":
            grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        else:
            grammar = M.grammar_from_regex(spec)
        m = M(self.tokenizer, grammar)  # llguidance compiles when a matcher is made: that is its compile
        assert not m.is_error(), m.get_error()
        return grammar

    def walk(self, grammar, ids):
        import torch

        m = self.llg.LLMatcher(self.tokenizer, grammar)
        mask = torch.full((1, (self.V + 31) // 32), -1, dtype=torch.int32)
        for t in ids:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)  # what llguidance.torch's fill does
            yield time.perf_counter() - t0, bool((int(mask[0, t // 32]) >> (t % 32)) & 1)
            assert m.consume_token(t), m.get_error()


def byte_level_vocabulary(tok) -> dict[bytes, list[int]]:
    """Each ordinary token's bytes, for a byte-level BPE tokenizer (GPT-2's printable stand-ins for
    bytes, undone); outlines-core takes a vocabulary of bytes, and its own Python package, which
    converts a HF tokenizer, is not installed."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    undo = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_ids)
    vocab: dict[bytes, list[int]] = {}
    for token, i in tok.get_vocab().items():
        if i in special or any(c not in undo for c in token):
            continue
        vocab.setdefault(bytes(undo[c] for c in token), []).append(i)
    return vocab


class OutlinesCore:
    name = "outlines_core"

    def __init__(self, tok, vocab_size: int):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.V, self.to_regex = outlines_core, vocab_size, build_regex_from_schema
        self.vocab = outlines_core.Vocabulary(tok.eos_token_id, byte_level_vocabulary(tok))

    def compile(self, kind, spec):
        if kind == "json":
            regex = self.to_regex(json.dumps(spec))
        elif kind == "choice":
            regex = "(" + "|".join(regex_escape(c) for c in spec) + ")"
        else:
            regex = spec
        return self.oc.Index(regex, self.vocab)

    def walk(self, index, ids):
        import torch

        guide, mask = self.oc.Guide(index), torch.zeros(1, (self.V + 31) // 32, dtype=torch.int32)
        for t in ids:
            t0 = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            yield time.perf_counter() - t0, bool((int(mask[0, t // 32]) >> (t % 32)) & 1)
            guide.advance(t)


def measure(lib_cls, tok, vocab_size: int, compiles: int, walks: int) -> dict:
    t0 = time.perf_counter()
    lib = lib_cls(tok, vocab_size)
    out = {"setup_s": round(time.perf_counter() - t0, 3)}
    for kind, (spec, text) in CASES.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        compile_s = median_time(lambda: lib.compile(kind, spec), compiles)
        grammar = lib.compile(kind, spec)
        steps, allowed, totals = [], True, []
        for _ in range(walks):
            walk = list(lib.walk(grammar, ids))
            steps += [dt for dt, _ in walk]
            totals.append(sum(dt for dt, _ in walk))
            allowed &= all(ok for _, ok in walk)
        # what one request pays: its grammar compiled once, then one mask per token
        request_ms = (compile_s + statistics.median(totals)) * 1e3
        out[kind] = {"compile_ms": round(compile_s * 1e3, 3), "mask_us": round(statistics.median(steps) * 1e6, 1),
                     "request_ms": round(request_ms, 3),
                     "mask_p90_us": round(sorted(steps)[int(0.9 * len(steps))] * 1e6, 1), "tokens": len(ids),
                     "text_allowed": allowed}
        print(f"{lib.name:14s} {kind:7s} compile {compile_s * 1e3:8.2f} ms   mask median "
              f"{out[kind]['mask_us']:8.1f} us   p90 {out[kind]['mask_p90_us']:8.1f} us   "
              f"request {request_ms:8.2f} ms  "
              f"({len(ids)} tokens, valid text allowed: {allowed})", flush=True)
    return out


def glue(tok, vocab_size: int, walks: int) -> dict:
    """What the server pays per token on top of llguidance's mask: softprompt/serve/structured.py's
    Matcher.allowed() (the mask as a bool tensor over the vocabulary), per constraint."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from softprompt.serve.structured import Constraint, Grammars

    grammars, out = Grammars(tok, vocab_size), {}
    specs = {"json": Constraint.json_schema(SCHEMA, "x"), "regex": Constraint("regex", REGEX),
             "choice": Constraint.choice(CHOICES, "x"), "repeat": Constraint("regex", REPEAT)}
    for kind, c in specs.items():
        ids, steps = tok(CASES[kind][1], add_special_tokens=False)["input_ids"], []
        for _ in range(walks):
            m = grammars.matcher(c)
            for t in ids:
                t0 = time.perf_counter()
                allowed = m.allowed()
                steps.append(time.perf_counter() - t0)
                assert allowed[t]
                m.accept(t)
        out[f"glue_{kind}_mask_us"] = round(statistics.median(steps) * 1e6, 1)
    print("serving glue (llguidance + bool mask):", out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    add_fail_section(ap)
    args = ap.parse_args()
    rec = Record("structured", quick=args.quick)
    import torch
    from transformers import AutoTokenizer

    from softprompt.io.load import embedded_model_dir

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    vocab_size = len(tok)
    compiles, walks = (3, 2) if args.quick else (10, 5)
    sections = Sections(fail=args.fail_section)
    result: dict = {"tokenizer": "SmolLM2-135M-Instruct", "vocab_size": vocab_size, "compiles": compiles,
                    "walks": walks, "libraries": {}, "versions": {}}
    keys = []
    for cls in (XGrammar, LLGuidance, OutlinesCore):
        try:
            from importlib.metadata import version

            result["versions"][cls.name] = version(cls.name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed: skipped, and said so
            print(f"{cls.name} is not installed: skipped", file=sys.stderr)
            continue
        got = sections(cls.name, measure, cls, tok, vocab_size, compiles, walks)
        if got is None:
            continue
        result["libraries"][cls.name] = got
        result[f"{cls.name}_setup_s"] = got["setup_s"]
        keys.append(f"{cls.name}_setup_s")
        for kind in CASES:
            for fig in ("compile_ms", "mask_us", "request_ms"):
                result[f"{cls.name}_{kind}_{fig}"] = got[kind][fig]
                keys.append(f"{cls.name}_{kind}_{fig}")
    got = sections("glue", glue, tok, vocab_size, walks) if "llguidance" in result["libraries"] else None
    if got:
        result.update(got)
        keys += list(got)
    sys.exit(rec.finish(result, keys, sections, threads=1))


if __name__ == "__main__":
    main()
