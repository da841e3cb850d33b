"""Structured outputs: a grammar per row (a JSON schema, a regex, a list of choices, or a Lark/GBNF
grammar) whose token mask that row's logits get before anything else, as vLLM does.

The library is llguidance (picked by measurement: bench/structured.py, docs/openai.md): its
compile is lazy (about a millisecond for any of the benchmark's grammars on the embedded model's
49k-token vocabulary, where xgrammar and outlines-core took up to seconds for a bounded repetition
a client may send), its work per step is bounded by its own limits, and it depends on nothing.

    grammars = Grammars(tokenizer, vocab_size)           # one per engine; the tokenizer is wrapped once
    grammars.check(Constraint("json", schema_text))      # at the door: StructuredError names the field
    m = grammars.matcher(constraint)                      # one per row
    logits = penalize(logits, ..., allowed=m.allowed(V))  # that row's mask (loops/generate.py)
    m.accept(token)                                       # after each accepted token
    m.done                                                # nothing but EOS may follow: the row ends

A row whose grammar is complete with nothing but EOS allowed ends there (finish reason "stop").
Where a grammar may end or go on (a number's digits), EOS is among its allowed tokens and the
model decides. A row that runs out of `max_tokens` first ends with "length", its output cut short,
as in vLLM.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from softprompt.serve.tasks import RequestError

KINDS = ("json", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20  # a constraint's text (schema, regex, grammar) at most; bounded before any work


class StructuredError(RequestError):
    """A constraint that cannot be used (bad schema, regex or grammar; a tokenizer the library cannot
    read): a 400 naming `param`, the request field it came from."""

    def __init__(self, message: str, param: str):
        super().__init__(message, code="bad_request")
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match. `kind` is one of KINDS; `spec` is its text: a JSON schema
    (JSON text), a regex, a JSON list of the choices, or a Lark or GBNF grammar. `options`: for
    JSON, llguidance's JSON options as sorted (key, value) pairs (whitespace). `param` names the
    request field it came from, for errors."""

    kind: str
    spec: str
    param: str = "structured_outputs"
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"a constraint's kind is one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.spec, str) or len(self.spec) > MAX_SPEC_CHARS:
            raise StructuredError(f"{self.param} must be text of at most {MAX_SPEC_CHARS} characters", self.param)

    @classmethod
    def json_schema(cls, schema, param: str, closed: bool = False, **options) -> "Constraint":
        """A JSON schema given as an object (dict) or as JSON text; `closed`: vLLM's
        disable_additional_properties (see closed_objects)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise StructuredError(f"{param} is not valid JSON: {e}", param) from None
        if not isinstance(schema, dict):
            raise StructuredError(f"{param} must be a JSON schema (an object)", param)
        if closed:
            schema = closed_objects(schema)
        opts = tuple(sorted((k, v) for k, v in options.items() if v is not None))
        return cls("json", json.dumps(schema), param, opts)  # keys in the client's order: properties come in it

    @classmethod
    def choice(cls, choices, param: str) -> "Constraint":
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise StructuredError(f"{param} must be a non-empty list of non-empty strings", param)
        return cls("choice", json.dumps(choices), param)


def closed_objects(schema):
    """vLLM's `disable_additional_properties`: every object of the schema that does not say otherwise
    gets `additionalProperties: false` (JSON Schema lets an object hold properties it does not name)."""
    if isinstance(schema, list):
        return [closed_objects(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _grammar_text(llg, c: Constraint) -> str:
    """The llguidance grammar of a constraint (not yet checked: validate_grammar does that)."""
    M = llg.LLMatcher
    try:
        if c.kind == "json":
            return M.grammar_from_json_schema(c.spec, overrides=dict(c.options) or None)
        if c.kind == "regex":
            return M.grammar_from_regex(c.spec)
        if c.kind == "choice":  # alternatives of literal strings (JSON string syntax is Lark's too)
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(x) for x in json.loads(c.spec)))
        return llg.grammar_from("grammar", c.spec)  # Lark, or GBNF (llama.cpp's) converted to Lark
    except ValueError as e:
        raise StructuredError(f"{c.param} is not a valid {c.kind}: {e}", c.param) from None


class Grammars:
    """The grammars of one engine: llguidance's view of the tokenizer (built on first use, ~1 s for a
    49k vocabulary) and the last `cache_size` checked grammars (checking costs about what compiling
    does; each row's matcher then compiles its own, lazily)."""

    def __init__(self, tokenizer, vocab_size: int | None = None, cache_size: int = 256):
        self.tokenizer, self.cache_size, self.vocab_size = tokenizer, cache_size, vocab_size
        self._llg = self._lltok = None
        self._checked: OrderedDict[Constraint, str] = OrderedDict()
        self._lock = threading.Lock()

    def _library(self):
        with self._lock:
            if self._lltok is None:
                import llguidance as llg  # a dependency of the plain install; imported on first use
                import llguidance.hf

                try:  # as many tokens as the model has logits, where it has more than the tokenizer
                    n_vocab = max(len(self.tokenizer), self.vocab_size or 0)
                    self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab)
                except Exception as e:  # noqa: BLE001 - e.g. a slow (Python) tokenizer: structured outputs refused
                    raise StructuredError(f"structured outputs are not available for this model's tokenizer "
                                          f"({type(self.tokenizer).__name__}): {e}", "structured_outputs") from None
                self._llg = llg
            return self._llg, self._lltok

    def check(self, c: Constraint) -> str:
        """The constraint's grammar, checked against the tokenizer; StructuredError (naming the
        field) for a schema, regex or grammar that llguidance refuses."""
        with self._lock:
            if c in self._checked:
                self._checked.move_to_end(c)
                return self._checked[c]
        llg, lltok = self._library()
        grammar = _grammar_text(llg, c)
        error = llg.LLMatcher.validate_grammar(grammar, lltok)
        if error:
            raise StructuredError(f"{c.param} is not a valid {c.kind}: {error.strip().splitlines()[0]}", c.param)
        with self._lock:
            self._checked[c] = grammar
            while len(self._checked) > self.cache_size:
                self._checked.popitem(last=False)
        return grammar

    def matcher(self, c: Constraint) -> "Matcher":
        """A fresh matcher for one row."""
        grammar = self.check(c)
        llg, lltok = self._library()
        m = llg.LLMatcher(lltok, grammar, log_level=0)
        if m.is_error():
            raise StructuredError(f"{c.param}: {m.get_error()}", c.param)
        return Matcher(m)


class Matcher:
    """One row's grammar state: the tokens allowed next, and the tokens taken so far."""

    def __init__(self, matcher):
        self._m = matcher

    def allowed(self) -> torch.Tensor:
        """(n_vocab,) bool: the tokens the grammar allows next (EOS among them where it may end).
        llguidance's byte-per-token form (0 or 200) rather than its bitmask: no unpacking, and no
        import of llguidance.torch, which compiles its kernel with torch.compile (seconds)."""
        return torch.from_numpy(np.frombuffer(self._m.compute_logit_bias(), dtype=np.uint8) != 0)

    def accept(self, token: int) -> None:
        """Advance past `token`; RequestError when the grammar does not allow it (when another
        constraint, e.g. allowed_token_ids, left the row no token the grammar allows)."""
        if not self._m.consume_token(token):
            raise RequestError("no token satisfies both the structured output's grammar and the request's other "
                               "token constraints (allowed_token_ids, bad_words, logit_bias, min_tokens)",
                               code="bad_request")

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing but EOS may follow."""
        return self._m.is_stopped()
