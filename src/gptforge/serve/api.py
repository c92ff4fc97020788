"""The OpenAI-compatible request bodies, checked field by field, and the JSON errors OpenAI's clients expect.

Every body is validated before any work: types, ranges, unknown fields (refused, as OpenAI does, so a typo
is not silently ignored), and options this server does not implement (n > 1, logprobs, penalties) are
refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        param = param or loc or None
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unrecognized request argument"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts), param


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1, description="not in OpenAI's API: keep the k most likely tokens")
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not implemented")
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="not implemented")
    logit_bias: dict | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not implemented")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > 64 for s in stops):
            raise ValueError("each stop sequence must have 1 to 64 characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None and set(v) - {"include_usage"}:
            raise ValueError("only include_usage is supported")
        return v


class CompletionBody(_Body):
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = Field(default=False)
    logprobs: None = Field(default=None, description="not implemented")
    best_of: int = Field(default=1, ge=1, le=1)
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of exactly one string)")
            v = v[0]
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = Field(default=None, max_length=64)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not implemented")
        return v

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
