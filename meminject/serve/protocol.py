"""Request bodies of the OpenAI endpoints meminject serves, and its error bodies.

Fields follow the OpenAI API (and its defaults: ``temperature`` 1, ``max_tokens`` 16
for completions); ``memories`` is meminject's own. Unknown fields are refused (400,
naming the field), as the OpenAI API does, rather than silently ignored. Options the
server does not implement but clients send with their neutral value
(``presence_penalty: 0``, ``frequency_penalty: 0``, ``response_format: {"type":
"text"}``) are accepted with that value and refused with any other, so a request is
never answered as if an option applied that did not.

Types are strict (no ``"yes"`` for a boolean, no ``true`` or ``1.5`` for an integer; an
integer is a number) and sizes are bounded (``stop``: at most :data:`MAX_STOPS`
strings of at most :data:`MAX_STOP_CHARS` characters), so what a request asks for is
what it meant and what it costs is known before it runs.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meminject.pydantic_errors import describe, field_path, first_error

#: The most stop strings a request may give, and the longest one, in characters.
MAX_STOPS = 16
MAX_STOP_CHARS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(
                'only {"type": "text"} is supported; this server cannot constrain replies to JSON'
            )
        return value


def _neutral_penalty(value: float) -> float:
    if value != 0:
        raise ValueError("is not supported; only 0 (no penalty, the default) is accepted")
    return value


class MemoryChoice(_Strict):
    """A memory of the loaded set, with this request's τ or enabled flag."""

    name: str
    tau: float | None = None
    enabled: bool | None = None

    @field_validator("tau")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("tau must be a finite number")
        return value


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: ResponseFormat | None = None
    #: Names of loaded memories (or choices with overrides); None or [] for none.
    memories: list[str | MemoryChoice] | None = None

    _penalties = field_validator("presence_penalty", "frequency_penalty")(_neutral_penalty)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, not {len(stops)}")
        for stop in stops:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise ValueError(
                    f"each stop string must have 1 to {MAX_STOP_CHARS} characters, not {len(stop)}"
                )
        return value

    def include_usage(self) -> bool:
        """``stream_options.include_usage``: a last chunk with the token counts."""
        return self.stream_options is not None and self.stream_options.include_usage

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: str
    max_tokens: int = Field(16, ge=0, le=4096)
    #: How many most likely tokens to report at each step (the legacy API allows 5).
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, le=4096)
    max_completion_tokens: int | None = Field(None, ge=0, le=4096)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def new_tokens(self, default: int) -> int:
        for value in (self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return value
        return default


class APIError(Exception):
    """An error a request caused, answered as OpenAI does: a status and a JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(exc: Any) -> APIError:
    """The first pydantic problem as a 400 naming its field (``messages.0.role``)."""
    first = first_error(exc.errors())
    param = field_path(first.get("loc", ()))
    message = describe(first, noun="field")
    return APIError(400, f"{param}: {message}" if param else message, param=param or None)
