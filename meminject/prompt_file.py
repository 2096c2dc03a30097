"""Prompt files for batched generation: JSONL, one request per line.

Each line is a JSON object: ``prompt`` (required), ``memories`` (names from the
``-m`` set; absent means the whole set, ``[]`` none), an ``id`` echoed back, and any
decoding option of :class:`meminject.generation.DecodeOptions` under its own name
(``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
``seed``, ``stop``, ``show_top``, ``ignore_eos``), overriding the command line's for that
line. Unknown keys are errors (a misspelt option would otherwise be ignored silently).

No torch here: a prompt file is checked before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from meminject.errors import BadInputError, one_line
from meminject.fsread import read_user_text
from meminject.pydantic_errors import describe, field_path, first_error
from meminject.schema import StrictModel

MAX_PROMPT_FILE_BYTES = 64 << 20


class PromptRequest(StrictModel):
    """One line of a prompt file."""

    prompt: str
    memories: list[str] | None = None
    id: str | int | None = None
    max_new_tokens: int | None = Field(default=None, ge=0, le=4096)
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    stop: list[str] | None = None
    show_top: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def overrides(self) -> dict[str, Any]:
        """The decoding options this line sets, as :class:`DecodeOptions` fields."""
        names = (
            "max_new_tokens",
            "temperature",
            "top_k",
            "top_p",
            "repetition_penalty",
            "seed",
            "show_top",
        )
        out: dict[str, Any] = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.stop is not None:
            out["stop"] = tuple(self.stop)
        if self.ignore_eos is not None:
            out["stop_at_eos"] = not self.ignore_eos
        return out


@dataclass(frozen=True)
class PromptLine:
    request: PromptRequest
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_prompt_requests(path: Path | str) -> list[PromptLine]:
    """Every request in a JSONL prompt file; blank lines are skipped. Errors name the
    file, the line and the field."""
    path = Path(path)
    text = read_user_text(path, MAX_PROMPT_FILE_BYTES, "prompt files")
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise BadInputError(
                f"{path}:{number}: a line must be a JSON object with a 'prompt', not "
                f"{type(data).__name__}"
            )
        try:
            request = PromptRequest.model_validate(data)
        except ValidationError as exc:
            error = first_error(exc.errors())
            field = field_path(error["loc"]) or "?"
            message = describe(error, known=PromptRequest.model_fields)
            raise BadInputError(one_line(f"{path}:{number}: field '{field}': {message}")) from None
        out.append(PromptLine(request, path, number))
    if not out:
        raise BadInputError(f"{path}: holds no prompts")
    return out
