"""The project's error types.

Every error a user can cause is a :class:`MeminjectError`; the CLI prints its
one-line message and exits with its ``exit_code`` instead of a traceback. Keeping
the location (file, memory, field, line) as data rather than baked into prose lets
tests assert on it and lets the CLI format it the same way everywhere.

Whatever a file name, a key or a value holds, an error's text is one line: every
control character (C0, DEL, C1, the Unicode line and paragraph separators, the
bidirectional overrides) is written as an escape (``\\n``, ``\\x1b``, ``\\u2028``), so
an error can neither span lines nor forge another line or recolour the terminal. Values
echoed back are bounded (:func:`echo`, :func:`shorten`), and so is the whole line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2

#: Longest value (or name) echoed back in an error, in characters.
MAX_ECHO = 200
#: Longest file name shown in an error location, in characters.
MAX_ECHO_FILE = 1000
#: Longest error line, in characters; longer ones are cut in the middle.
MAX_LINE = 4000

# C0 and C1 controls, DEL, NEL, line/paragraph separators, bidi embeddings, overrides and
# isolates (U+202A–U+202E, U+2066–U+2069), the zero-width/bidi marks U+200B–U+200F, and
# the BOM: anything that can end a line, move the cursor or reorder what is shown.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str) -> str:
    """``text`` with every control or line-breaking character escaped, and bounded."""
    text = _UNSAFE.sub(_escape, text)
    if len(text) > MAX_LINE:
        keep = (MAX_LINE - 40) // 2  # room for the marker: the result fits, so this is stable
        text = f"{text[:keep]}…[{len(text) - 2 * keep} characters cut]…{text[-keep:]}"
    return text


def shorten(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis and the original length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def echo(value: object, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` for an error message, at most about ``limit`` characters."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    if len(text) > limit:
        return f"{text[:limit]}… ({len(text)} characters)"
    return text


class MeminjectError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with. Its text is always one line."""

    exit_code = EXIT_RUNTIME

    def __str__(self) -> str:
        return one_line(super().__str__())


class BadInputError(MeminjectError):
    """Something the user passed (a flag, a prompt, a path) cannot be used."""

    exit_code = EXIT_BAD_INPUT


class ContextTooLongError(BadInputError):
    """A prompt or text is longer than the model's context (a server answers 413)."""


@dataclass(frozen=True)
class Location:
    """Where in a memory set an error lies; every part is optional."""

    file: Path | str | None = None
    line: int | None = None
    memory: str | None = None  # "'name'" or "#index"
    field: str | None = None  # a TOML path such as "tau" or "contrast.negative"

    def render(self) -> str:
        parts: list[str] = []
        if self.file is not None:
            file = shorten(str(self.file), MAX_ECHO_FILE)
            parts.append(f"{file}:{self.line}" if self.line else file)
        if self.memory is not None:
            parts.append(f"memory {shorten(self.memory)}")
        if self.field is not None:
            parts.append(f"field '{shorten(self.field)}'")
        return ": ".join(parts)


class MemoryFileError(BadInputError):
    """A memory file (or set of files) is malformed or does not fit the model."""

    def __init__(self, message: str, location: Location | None = None) -> None:
        self.message = message
        self.location = location or Location()
        where = self.location.render()
        text = f"{where}: {message}" if where else message
        # One line, whatever a file name or a value smuggles in.
        super().__init__(one_line(text))


class ModelLoadError(BadInputError):
    """A model could not be found or downloaded."""


class PluginError(MeminjectError):
    """A plugin failed to import, registered a clashing name, or broke a contract."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin '{plugin}': {message}")


class PluginConfigError(PluginError):
    """The user's plugin selection names a plugin that is not installed (bad input)."""

    exit_code = EXIT_BAD_INPUT


class InjectionError(MeminjectError):
    """A hook failed while a memory set was active (the model's hooks are restored)."""


class NonFiniteScoresError(InjectionError):
    """A prompt's next-token scores became non-finite (inf or NaN) while it generated,
    almost always because a memory's τ·v pushed the activations past the dtype's range.
    In a batch it ends that prompt only (a server answers its request 400): the other
    rows compute on their own activations and are unaffected."""


class RowError(BadInputError):
    """A dataset row cannot be used; ``row_id`` says which, and the command that knows
    the dataset's file adds its name (:meth:`in_dataset`), so the line points at it."""

    def __init__(self, message: str, row_id: int) -> None:
        self.row_id = row_id
        super().__init__(message)

    def in_dataset(self, source: str) -> RowError:
        """The same error, prefixed with the dataset it came from."""
        return type(self)(f"{source}: {self}", self.row_id)


class RowTooLongError(RowError, ContextTooLongError):
    """A dataset row is longer than the model's context."""
