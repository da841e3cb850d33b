"""Request bodies of the OpenAI-compatible API.

Every request field of OpenAI's completions and chat completions is either honoured (a field of
these models) or refused with a 400 naming it (`REFUSED_*`: a field we do not implement, refused
unless its value asks for nothing, e.g. `"tools": []`). Fields that are not OpenAI's are ignored,
as clients send extras. `top_k` is vLLM's extension. `user`, `safety_identifier`,
`prompt_cache_key` and `metadata` are labels: accepted, with no effect on the output (as at OpenAI,
where they only tag or route a request).

Numbers and flags are strict: `max_tokens: true` or `"stream": 1` is a 422, not 1 token or a stream
(pydantic's lax mode would take them); a float field still takes a JSON integer. `null` means the
default, as OpenAI's own types allow."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError

MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows (OpenAI: 5 for completions, 20 for chat)


def refuse(field: str, message: str) -> PydanticCustomError:
    """A 400 naming `field` (errors.py turns this error type into OpenAI's shape)."""
    return PydanticCustomError("refused_parameter", "{message}", {"field": field, "message": message})


def _no_tools(v) -> bool:
    return v in (None, [], "none")


# field -> a test that its value asks for nothing we lack (then it is accepted)
REFUSED_COMMON = {
    "logit_bias": lambda v: v in (None, {}),
}
REFUSED_COMPLETION = {
    **REFUSED_COMMON,
    "suffix": lambda v: v in (None, ""),
    "best_of": None,  # special: only best_of == n (no choice among extra samples) is accepted, see below
}
REFUSED_CHAT = {
    **REFUSED_COMMON,
    "tools": _no_tools, "tool_choice": _no_tools, "functions": _no_tools, "function_call": _no_tools,
    "parallel_tool_calls": lambda v: v is None,
    "response_format": lambda v: v is None or v == {"type": "text"},
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
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = Field(None, description="a last chunk with no choices and the usage")
    include_obfuscation: StrictBool | None = None  # refused when true (see _Common.check)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
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
    user: str | None = None  # a label (no effect on the output)
    safety_identifier: str | None = None  # a label
    prompt_cache_key: str | None = None  # a routing hint; the prefix cache needs none

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data):
        """A 400 naming the first OpenAI field we do not implement (unless its value asks for nothing)."""
        if isinstance(data, dict):
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
