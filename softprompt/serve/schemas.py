"""Request bodies of the OpenAI-compatible API (the fields we honour; unknown fields are ignored,
as OpenAI clients send extras).

Numbers and flags are strict: `max_tokens: true` or `"stream": 1` is a 422, not 1 token or a stream
(pydantic's lax mode would take them); a float field still takes a JSON integer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256, description="a task name (`name` or `name@version`) or the base model id")
    max_tokens: StrictInt | None = Field(None, ge=1, le=4096, description="new tokens at most (default 16)")
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0, description="0 is greedy (as is anything below 1e-4)")
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=64, description="choices per prompt")
    stream: StrictBool = False
    stop: StrictStr | list[StrictStr] | None = Field(None, description="up to 4 stop strings")
    seed: StrictInt | None = Field(None, ge=0, le=2**62, description="the same seed gives the same tokens")
    user: str | None = None

    def model_post_init(self, _):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] = Field(description="a prompt, or a list of prompts (one choice set each)")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr = Field(max_length=1 << 20)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=4096)

    def model_post_init(self, _):
        super().model_post_init(_)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens


MAX_INPUTS = 64  # texts per POST /v1/classify request


class ClassifyRequest(BaseModel):
    """The body of POST /v1/classify."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256, description="a classification task (`name` or `name@version`)")
    input: str | list[str] = Field(description=f"a text, or a list of up to {MAX_INPUTS} texts")
