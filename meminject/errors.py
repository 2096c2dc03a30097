"""The project's error types.

Every error a user can cause is a :class:`MeminjectError`; the CLI prints its
one-line message and exits with its ``exit_code`` instead of a traceback. Keeping
the location (file, memory, field, line) as data rather than baked into prose lets
tests assert on it and lets the CLI format it the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2


class MeminjectError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_RUNTIME


class BadInputError(MeminjectError):
    """Something the user passed (a flag, a prompt, a path) cannot be used."""

    exit_code = EXIT_BAD_INPUT


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
            parts.append(f"{self.file}:{self.line}" if self.line else str(self.file))
        if self.memory is not None:
            parts.append(f"memory {self.memory}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts)


class MemoryFileError(BadInputError):
    """A memory file (or set of files) is malformed or does not fit the model."""

    def __init__(self, message: str, location: Location | None = None) -> None:
        self.message = message
        self.location = location or Location()
        where = self.location.render()
        text = f"{where}: {message}" if where else message
        # One line, whatever a file name or a value smuggles in.
        super().__init__(text.replace("\r", "\\r").replace("\n", "\\n"))


class ModelLoadError(BadInputError):
    """A model could not be found or downloaded."""


class PluginError(MeminjectError):
    """A plugin failed to import, registered a clashing name, or broke a contract."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin '{plugin}': {message}")


class InjectionError(MeminjectError):
    """A hook failed while a memory set was active (the model's hooks are restored)."""
