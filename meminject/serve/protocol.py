"""Request bodies of the OpenAI endpoints meminject serves, and its error bodies.

Fields follow the OpenAI API (and its defaults: ``temperature`` 1, ``max_tokens`` 16
for completions); ``memories`` is meminject's own. Unknown fields are refused (400,
naming the field), as the OpenAI API does, rather than silently ignored.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meminject.pydantic_errors import describe, field_path, first_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    #: Names of loaded memories (or choices with overrides); None or [] for none.
    memories: list[str | MemoryChoice] | None = None

    def include_usage(self) -> bool:
        """``stream_options.include_usage``: a last chunk with the token counts."""
        return bool((self.stream_options or {}).get("include_usage"))

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
    ):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(exc: Any) -> APIError:
    """The first pydantic problem as a 400 naming its field (``messages.0.role``)."""
    first = first_error(exc.errors())
    param = field_path(first.get("loc", ()))
    message = describe(first, noun="field")
    return APIError(400, f"{param}: {message}" if param else message, param=param or None)
