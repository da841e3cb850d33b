"""Request bodies of the OpenAI-compatible API.

Every request field is honoured (a field of these models), a label, or refused with a 400 naming it
in OpenAI's shape (`param` = the field): a field no one defines gets OpenAI's own message,
"Unrecognized request argument supplied: X"; an OpenAI or vLLM field we do not implement
(`REFUSED_*`) is refused unless its value asks for nothing, e.g. `"tools": []` or
`"use_beam_search": false`. Honoured beyond OpenAI's fields: vLLM's sampling fields (`top_k`,
`min_p`, `repetition_penalty`, `min_tokens`, `stop_token_ids`, `include_stop_str_in_output`,
`ignore_eos`, `allowed_token_ids`, `bad_words`, `add_special_tokens`, `request_id`) and structured
outputs (`response_format`, vLLM's `structured_outputs` and its older `guided_*` fields: one
`Constraint`, serve/structured.py). `user`, `safety_identifier`, `prompt_cache_key`, `metadata`,
`session_id` and `cache_salt` are labels: accepted, with no effect on the output (as at OpenAI,
where they only tag or route a request; the prefix cache here holds tasks' prefixes, never a
client's prompt, so there is nothing for a salt to separate).

Numbers and flags are strict: `max_tokens: true` or `"stream": 1` is refused, not 1 token or a
stream (pydantic's lax mode would take them); a float field still takes a JSON integer. `null`
means the default, as OpenAI's own types allow."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

from softprompt.serve.structured import Constraint, StructuredError

MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows (OpenAI: 5 for completions, 20 for chat)


def refuse(field: str, message: str) -> PydanticCustomError:
    """A 400 naming `field` (errors.py turns this error type into OpenAI's shape)."""
    return PydanticCustomError("refused_parameter", "{message}", {"field": field, "message": message})


def _no_tools(v) -> bool:
    return v in (None, [], "none")


def unrecognized(data: dict, known, prefix: str = "") -> None:
    """OpenAI's 400 for the first key of `data` that is not in `known`."""
    for name in data:
        if name not in known:
            raise refuse(prefix + name, f"Unrecognized request argument supplied: {prefix + name}")


def _only(*values):
    """A test that a value is one of `values` (a bool only equals a bool: 0 is not false)."""
    return lambda v: any(v is x if isinstance(x, bool) or x is None else (v == x and not isinstance(v, bool))
                         for x in values)


# field -> a test that its value asks for nothing we lack (then it is accepted)
REFUSED_COMMON = {  # vLLM's fields we do not implement, each accepted at its default
    "use_beam_search": _only(None, False), "length_penalty": _only(None, 1), "watermarking": _only(None, False),
    "skip_special_tokens": _only(None, True),  # special tokens are always left out of the text
    "spaces_between_special_tokens": _only(None, True),
    "truncate_prompt_tokens": _only(None), "truncation_side": _only(None), "prompt_logprobs": _only(None),
    "logprob_token_ids": _only(None), "prompt_embeds": _only(None), "priority": _only(None, 0),
    "return_tokens_as_token_ids": _only(None, False), "return_token_ids": _only(None, False),
    "return_token_offsets": _only(None, False), "return_mm_kwargs": _only(None, True),
    "kv_transfer_params": _only(None), "ec_transfer_params": _only(None), "vllm_xargs": _only(None, {}),
    "repetition_detection": _only(None), "thinking_token_budget": _only(None, -1),
    "stream_interval": _only(None, 1),  # every token is its own chunk
    "routed_experts_prompt_start": _only(None, 0), "logits_processors": _only(None, []),
    "guided_decoding_backend": _only(None, "auto", "guidance"),  # llguidance is vLLM's "guidance" backend
}
REFUSED_COMPLETION = {
    **REFUSED_COMMON,
    "suffix": lambda v: v in (None, ""),
    "best_of": None,  # special: only best_of == n (no choice among extra samples) is accepted, see below
}
REFUSED_CHAT = {
    **REFUSED_COMMON,
    "tools": _no_tools, "tool_choice": _no_tools, "functions": _no_tools, "function_call": _no_tools,
    "parallel_tool_calls": _only(None, True, False),  # with no tools (they are refused) either asks for nothing
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "verbosity": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "moderation": lambda v: v is None,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "store": lambda v: v in (None, False),
    "prompt_cache_retention": lambda v: v is None,
    "prompt_cache_options": lambda v: v is None,
    # vLLM's chat fields we do not implement (the prompt format is the task's: prompt_format.py)
    "echo": _only(None, False), "add_generation_prompt": _only(None, True),
    "continue_final_message": _only(None, False),
    "documents": _only(None), "chat_template": _only(None), "chat_template_kwargs": _only(None, {}),
    "media_io_kwargs": _only(None, {}), "mm_processor_kwargs": _only(None, {}), "include_reasoning": _only(None, True),
    "return_prompt_text": _only(None, False),
}


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = Field(None, description="a last chunk with no choices and the usage")
    include_obfuscation: StrictBool | None = None  # refused when true (see _Common.check)

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data):
        if isinstance(data, dict):
            if data.get("continuous_usage_stats") not in (None, False):  # vLLM's: usage in every chunk
                raise refuse("stream_options.continuous_usage_stats", "continuous_usage_stats is not supported "
                                                                      "(the usage comes in the last chunk)")
            unrecognized(data, {*cls.model_fields, "continuous_usage_stats"}, "stream_options.")
        return data


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's structured outputs (`strict` changes nothing here: the
    output always follows the schema)."""

    name: StrictStr | None = Field(None, max_length=64)
    description: StrictStr | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: StrictBool | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data):
        if isinstance(data, dict):
            unrecognized(data, {"name", "description", "schema", "strict"}, "response_format.json_schema.")
        return data


class ResponseFormat(BaseModel):
    """`{"type": "text"}` (no constraint), `{"type": "json_object"}` (any JSON object), or
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data):
        if isinstance(data, dict):
            if data.get("type") == "structural_tag":
                raise refuse("response_format.type", "structural_tag response formats are not supported")
            unrecognized(data, {"type", "json_schema"}, "response_format.")
        return data


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object."""

    json_: dict | StrictStr | None = Field(None, alias="json", description="a JSON schema (object or JSON text)")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = Field(None, description="a Lark grammar, or a GBNF one (llama.cpp's)")
    json_object: StrictBool | None = None
    disable_any_whitespace: StrictBool | None = False
    disable_additional_properties: StrictBool | None = False
    whitespace_pattern: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data):
        if isinstance(data, dict):
            if data.get("structural_tag") is not None:
                raise refuse("structured_outputs.structural_tag", "structural_tag is not supported by this server")
            unrecognized(data, {*(f.alias or n for n, f in cls.model_fields.items()), "structural_tag"},
                         "structured_outputs.")
        return data


def _constraint(kind: str, value, param: str, whitespace_pattern: str | None, flexible: bool = True,
                closed: bool = False) -> Constraint:
    if kind == "json":
        opts = {"whitespace_pattern": whitespace_pattern} if whitespace_pattern else {}
        if not flexible:
            opts["whitespace_flexible"] = False
        return Constraint.json_schema(value, param, closed, **opts)
    if kind == "choice":
        return Constraint.choice(value, param)
    return Constraint(kind, value, param)


class _Common(BaseModel):
    refused: ClassVar[dict] = {}  # overridden per endpoint

    model: str = Field(min_length=1, max_length=256, description="a task name (`name` or `name@version`) or the base model id")
    max_tokens: StrictInt | None = Field(None, ge=1, le=4096, description="new tokens at most (default 16)")
    temperature: StrictFloat | None = Field(1.0, ge=0.0, le=2.0, description="0 is greedy (as is anything below 1e-4)")
    top_p: StrictFloat | None = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, description="vLLM's extension: sample among the k likeliest tokens "
                                                             "(0 or -1: no cut)")
    n: StrictInt | None = Field(1, ge=1, le=64, description="choices per prompt")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = Field(None, description="up to 4 stop strings")
    seed: StrictInt | None = Field(None, ge=0, le=2**62, description="the same seed gives the same tokens")
    presence_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0, description="subtracted once from the logit "
                                                 "of every token already generated")
    frequency_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0, description="subtracted from a token's "
                                                  "logit once per time it was generated")
    # vLLM's sampling fields (vLLM's meaning: softprompt.loops.generate.SamplingParams)
    min_p: StrictFloat | None = Field(None, ge=0.0, le=1.0, description="drop tokens less likely than min_p times "
                                                                        "the likeliest (after temperature)")
    repetition_penalty: StrictFloat | None = Field(None, gt=0.0, allow_inf_nan=False, description=(
        "on every token of the prompt and of the output so far: a logit > 0 is divided by it, others multiplied"))
    min_tokens: StrictInt | None = Field(None, ge=0, le=4096, description="no EOS, stop token or stop string "
                                                                          "before this many new tokens")
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=1024, description="token ids that end the "
                                                   "output (kept in it unless special); finish_reason 'stop'")
    include_stop_str_in_output: StrictBool | None = Field(False, description="keep the stop string in the text")
    ignore_eos: StrictBool | None = Field(False, description="go on past EOS")
    logit_bias: dict[str, StrictFloat] | None = Field(None, max_length=1024, description="token id (a string) "
                                                      "-> a bias in [-100, 100], added to its logit")
    allowed_token_ids: list[StrictInt] | None = Field(None, min_length=1, max_length=1 << 18,
                                                      description="only these tokens may be generated")
    bad_words: list[StrictStr] | None = Field(None, max_length=128, description="words never to complete")
    add_special_tokens: StrictBool | None = Field(None, description="tokenize the prompt with the tokenizer's "
                                                  "special tokens (default: as the model was trained)")
    request_id: StrictStr | None = Field(None, min_length=1, max_length=256, description="the response's id, "
                                         "after its cmpl- or chatcmpl- prefix")
    # structured outputs: at most one of these (serve/structured.py)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | StrictStr | None = Field(None, description="vLLM's older form of structured_outputs.json")
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    guided_whitespace_pattern: StrictStr | None = None
    user: str | None = None  # a label (no effect on the output)
    safety_identifier: str | None = None  # a label
    prompt_cache_key: str | None = None  # a routing hint; the prefix cache needs none
    session_id: StrictStr | None = Field(None, max_length=1024)  # vLLM's label
    cache_salt: StrictStr | None = Field(None, min_length=1, max_length=1024)  # nothing to salt: a label
    _constraint: Constraint | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data):
        """A 400 naming the first field we do not implement (unless its value asks for nothing), or the
        first field no one defines."""
        if isinstance(data, dict):
            unrecognized(data, {*cls.refused, *cls.model_fields})
            for name, fine in cls.refused.items():
                if name not in data:
                    continue
                v = data[name]
                if name == "best_of":
                    if v is None or (v == (data.get("n") or 1) and not isinstance(v, bool)):
                        continue
                    raise refuse(name, "best_of is not supported (only best_of equal to n): ask for n choices "
                                       "with logprobs and rank them yourself")
                if not fine(v):
                    raise refuse(name, f"{name} is not supported by this server")
        return data

    def model_post_init(self, _):
        # null means the default, as OpenAI's types allow
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("n", 1), ("stream", False),
                              ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
            if getattr(self, name) is None:
                setattr(self, name, default)
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")

    @model_validator(mode="after")
    def _check(self):
        if self.logit_bias:
            for k, v in self.logit_bias.items():
                if not (k.isascii() and k.isdigit()) or not -100 <= v <= 100:  # "²" is a digit to isdigit
                    raise refuse("logit_bias", "logit_bias maps token ids (strings of digits) to biases in "
                                               f"[-100, 100]; got {k!r}: {v}")
        if self.bad_words and not all(w.strip() for w in self.bad_words):
            raise refuse("bad_words", "bad_words must be non-blank strings")
        self._constraint = self._structured()
        if self.stream_options is not None:
            if not self.stream:
                raise refuse("stream_options", "stream_options is only allowed when stream is true")
            if self.stream_options.include_obfuscation:
                raise refuse("stream_options.include_obfuscation", "include_obfuscation is not supported "
                                                                   "(stream chunks carry no padding field)")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def constraint(self) -> Constraint | None:
        """What the output must match (structured outputs), or None."""
        return self._constraint

    def _structured(self) -> Constraint | None:
        """The one structured-output constraint the body asks for, from whichever field (a 400 naming
        the field when two are given or one is malformed)."""
        asked = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", lambda: Constraint.json_schema({"type": "object"}, "response_format")))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise refuse("response_format.json_schema", "a json_schema response format needs json_schema.schema")
            asked.append(("response_format", lambda: Constraint.json_schema(rf.json_schema.schema_,
                                                                            "response_format.json_schema.schema")))
        ws = self.guided_whitespace_pattern
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                asked.append((name, lambda name=name, kind=kind: _constraint(kind, getattr(self, name), name, ws)))
        so = self.structured_outputs
        if so is not None:
            kinds = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(so, k) not in
                     (None, False)]
            if len(kinds) != 1:
                raise refuse("structured_outputs", "structured_outputs takes exactly one of json, regex, choice, "
                                                   f"grammar, json_object; got {len(kinds)}")
            kind = kinds[0].rstrip("_")
            value = {"type": "object"} if kind == "json_object" else getattr(so, kinds[0])
            param = f"structured_outputs.{kind}"
            asked.append(("structured_outputs", lambda: _constraint(
                "json" if kind == "json_object" else kind, value, param, so.whitespace_pattern,
                flexible=not so.disable_any_whitespace, closed=bool(so.disable_additional_properties))))
        if len(asked) > 1:
            raise refuse(asked[1][0], f"only one structured output constraint per request; got "
                                      f"{' and '.join(name for name, _ in asked)}")
        if not asked:
            return None
        try:
            return asked[0][1]()
        except StructuredError as e:
            raise refuse(e.param, str(e)) from None


class CompletionRequest(_Common):
    refused: ClassVar[dict] = REFUSED_COMPLETION

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="a prompt, a list of prompts (one choice set each), or token ids (a list, or a list of lists)")
    echo: StrictBool | None = Field(False, description="the prompt's text before each completion (with logprobs: "
                                                       "its tokens' logprobs too)")
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS, description="each token's logprob and this many "
                                                                               "likeliest alternatives")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt as token ids
        return list(p)


class TextPart(BaseModel):
    """A chat content part; only text parts are supported (others are refused, named)."""

    model_config = ConfigDict(extra="ignore")

    type: StrictStr
    text: StrictStr | None = Field(None, max_length=1 << 20)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] = Field(max_length=1 << 20)

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (as vLLM does)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content)


class ChatRequest(_Common):
    refused: ClassVar[dict] = REFUSED_CHAT

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=4096)
    logprobs: StrictBool | None = Field(False, description="each new token's logprob")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: this many "
                                                                                     "likeliest alternatives per token")
    metadata: dict[str, str] | None = None  # a label (OpenAI stores it with stored completions; we store none)

    def model_post_init(self, _):
        super().model_post_init(_)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens

    @model_validator(mode="after")
    def _chat_check(self):
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text":
                        raise refuse(f"messages.{i}.content.{j}.type", f"content parts of type {part.type!r} are "
                                                                       "not supported (only 'text')")
                    if part.text is None:
                        raise refuse(f"messages.{i}.content.{j}.text", "a text content part needs its text")
        if self.top_logprobs is not None and not self.logprobs:
            raise refuse("top_logprobs", "top_logprobs needs logprobs: true")
        return self


MAX_INPUTS = 64  # texts per POST /v1/classify request


class ClassifyRequest(BaseModel):
    """The body of POST /v1/classify."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256, description="a classification task (`name` or `name@version`)")
    input: str | list[str] = Field(description=f"a text, or a list of up to {MAX_INPUTS} texts")
