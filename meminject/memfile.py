"""Memory files → validated memory sets, with errors that point at file, memory, field, line.

tomllib gives a line only for syntax errors; for validation errors the line is
found by scanning the source for the memory's ``[[memory]]`` header and the key
inside its block. That is a heuristic (inline-table arrays get no line), which is
fine: the line is a convenience, the file/memory/field triple is the contract.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from meminject.errors import Location, MemoryFileError
from meminject.schema import FORMAT_VERSION, NAME_PATTERN, FieldValueError, MemoryBase, ModelInfo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Largest memory file read, in bytes. Memory files are small; a larger one is a mistake
#: or an attack, and reading it would only waste memory.
MAX_FILE_BYTES = 1 << 20

_HEADER = re.compile(r"^\s*\[\[\s*memory\s*\]\]\s*(#.*)?$")
_TABLE = re.compile(r"^\s*\[")
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")


@dataclass(frozen=True)
class MemoryEntry:
    """A validated memory and where it came from."""

    memory: Any  # a MemoryBase subclass instance
    file: Path
    index: int  # 0-based position among the file's [[memory]] tables
    source: str  # the file's text, for line lookup
    model_info: ModelInfo | None = None  # the file's [model] table

    @property
    def name(self) -> str:
        return str(self.memory.name)

    def location(self, field: str | None = None) -> Location:
        line = field_line(self.source, self.index, field.split(".")[0] if field else None)
        return Location(self.file, line, f"'{self.name}'", field)

    def error(self, message: str, field: str | None = None) -> MemoryFileError:
        return MemoryFileError(message, self.location(field))


@dataclass(frozen=True)
class LoadedFile:
    path: Path
    model: ModelInfo | None
    entries: tuple[MemoryEntry, ...]


@dataclass(frozen=True)
class MemorySet:
    """Memories from any mix of files and directories; names are unique across the set."""

    files: tuple[LoadedFile, ...]

    @property
    def entries(self) -> list[MemoryEntry]:
        return [entry for f in self.files for entry in f.entries]

    @property
    def memories(self) -> list[Any]:
        return [entry.memory for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> MemoryEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def model_info(self) -> ModelInfo | None:
        """The set's ``[model]`` table; files that declare one must agree."""
        declared = [(f.path, f.model) for f in self.files if f.model is not None]
        if not declared:
            return None
        first_path, first = declared[0]
        for path, other in declared[1:]:
            for key in ModelInfo.model_fields:
                a, b = getattr(first, key), getattr(other, key)
                if a is not None and b is not None and a != b:
                    raise MemoryFileError(
                        f"[model] {key} = {b!r} disagrees with {a!r} in {first_path}",
                        Location(
                            path,
                            field_line(_read_text(path), None, key, table="model"),
                            None,
                            f"model.{key}",
                        ),
                    )
        merged: dict[str, Any] = {}
        for _, info in declared:
            for key, value in info.model_dump().items():
                if value is not None:
                    merged.setdefault(key, value)
        return ModelInfo(**merged)


def field_line(
    source: str, memory_index: int | None, key: str | None, table: str | None = None
) -> int | None:
    """1-based line of ``key`` inside the ``memory_index``-th ``[[memory]]`` block (or of
    the block's header when the key is not written there), or of ``key`` in ``[table]``."""
    lines = source.splitlines()
    start = end = None
    if memory_index is not None:
        headers = [i for i, line in enumerate(lines) if _HEADER.match(line)]
        if not headers:  # an inline array: point at "memory = [...]"
            inline = re.compile(r"^\s*memory\s*=")
            return next((i + 1 for i, line in enumerate(lines) if inline.match(line)), None)
        if memory_index >= len(headers):
            return None
        start = headers[memory_index]
    elif table is not None:
        pattern = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        start = next((i for i, line in enumerate(lines) if pattern.match(line)), None)
        if start is None:
            return None
    else:
        start = -1
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if _TABLE.match(lines[i]) and not re.match(r"^\s*\[\s*memory\.", lines[i])
        ),
        len(lines),
    )
    if key is not None:
        key_re = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
        for i in range(start + 1, end):
            if key_re.match(lines[i]):
                return i + 1
        sub = re.compile(rf"^\s*\[\s*memory\.{re.escape(key)}\s*\]")
        for i in range(start + 1, end):
            if sub.match(lines[i]):
                return i + 1
    return start + 1 if start >= 0 else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _known_keys(registry: Any) -> list[str]:
    keys = {"version", "model", "memory", *ModelInfo.model_fields}
    models: list[type[BaseModel]] = [
        e.strategy_cls.memory_model for e in registry.strategies.values()
    ]
    models += [e.params_model for e in registry.encoders.values() if e.params_model is not None]
    for model in models:
        for name, info in model.model_fields.items():
            keys.add(name)
            alias = info.validation_alias
            choices = getattr(alias, "choices", None)
            if choices:
                keys |= {c for c in choices if isinstance(c, str)}
    return sorted(keys)


def _describe(err: dict[str, Any], registry: Any) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    loc = err["loc"]
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        known = _known_keys(registry)
        if key in known:
            return f"key '{key}' repeats a field already given under another name"
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{key}'{hint}"
    if kind == "missing":
        return "required field is missing"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a table, got {err['input']!r}"
    if kind == "unknown_strategy":
        return f"unknown strategy {err['input'].get('strategy')!r}; registered: " + ", ".join(
            registry.strategies
        )
    if kind == "literal_error" and loc == ("version",):
        return (
            f"unsupported version {err['input']!r}; this meminject reads version {FORMAT_VERSION}"
        )
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if (
        kind not in ("value_error", "assertion_error")
        and "input" in err
        and not isinstance(err["input"], (dict, list))
    ):
        msg = f"{msg}, got {err['input']!r}"
    return msg


def _location_of(
    err: dict[str, Any], path: Path, data: dict[str, Any], source: str, registry: Any
) -> Location:
    # Union branches show up in locations as labels like "literal['all','last']"; a
    # TOML path never contains brackets, so they are dropped.
    loc = [p for p in err["loc"] if not (isinstance(p, str) and "[" in p)]
    ctx_error = (err.get("ctx") or {}).get("error")
    memory_label = None
    line = None
    if len(loc) >= 2 and loc[0] == "memory" and isinstance(loc[1], int):
        index = loc[1]
        raw = data.get("memory", [])
        raw_memory = raw[index] if isinstance(raw, list) and index < len(raw) else {}
        name = raw_memory.get("name") if isinstance(raw_memory, dict) else None
        # Only a valid name is quoted back; anything else (a newline, a control character)
        # could break the one-line error, so the memory is named by its number instead.
        valid = isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None
        memory_label = f"'{name}'" if valid else f"#{index + 1}"
        rest = loc[2:]
        if rest and rest[0] in registry.strategies:
            rest = rest[1:]  # the discriminated union's tag
        if isinstance(ctx_error, FieldValueError):
            rest = [ctx_error.field]
        field = ".".join(str(p) for p in rest) or None
        line = field_line(source, index, str(rest[0]) if rest else None)
    elif loc and loc[0] == "model":
        field = ".".join(str(p) for p in loc) or None
        line = field_line(source, None, str(loc[1]) if len(loc) > 1 else None, table="model")
    else:
        if isinstance(ctx_error, FieldValueError):
            loc = [ctx_error.field]
        field = ".".join(str(p) for p in loc) or None
        if loc:
            line = field_line(source, None, str(loc[0]))
    return Location(path, line, memory_label, field)


def read_memory_file(path: Path | str, registry: Any | None = None) -> LoadedFile:
    """Read and validate one memory file."""
    from meminject.plugins import get_registry

    registry = registry or get_registry()
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MemoryFileError("no such file", Location(path)) from None
    except OSError as exc:
        raise MemoryFileError(f"cannot read: {exc.strerror}", Location(path)) from None
    if not path.is_file():
        raise MemoryFileError("not a regular file", Location(path))
    if size > MAX_FILE_BYTES:
        raise MemoryFileError(
            f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for memory files",
            Location(path),
        )
    try:
        source = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MemoryFileError(
            f"not UTF-8 text ({exc.reason} at byte {exc.start})", Location(path)
        ) from None
    except OSError as exc:
        raise MemoryFileError(f"cannot read: {exc.strerror}", Location(path)) from None
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        match = _TOML_LINE.search(text)
        line = int(match.group(1)) if match else None
        reason = _TOML_LINE.sub("", text).strip()
        raise MemoryFileError(f"invalid TOML: {reason}", Location(path, line)) from None
    try:
        validated: Any = registry.file_model.model_validate(data)
    except ValidationError as exc:
        # A typo shows up twice (an unknown key and a missing field); the unknown key is
        # the cause, so it is reported first.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        message = _describe(dict(first), registry)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})"
        location = _location_of(dict(first), path, data, source, registry)
        raise MemoryFileError(message, location) from None
    entries = tuple(
        MemoryEntry(memory, path, i, source, validated.model)
        for i, memory in enumerate(validated.memory)
    )
    _check_unique(entries)
    return LoadedFile(path, validated.model, entries)


def _check_unique(entries: Iterable[MemoryEntry]) -> None:
    owner: dict[str, MemoryEntry] = {}
    for entry in entries:
        if entry.name in owner:
            first = owner[entry.name]
            where = f"memory #{first.index + 1} of {first.file}"
            raise entry.error(f"duplicate memory name, already used by {where}", "name")
        owner[entry.name] = entry


def expand_paths(paths: Sequence[Path | str]) -> list[Path]:
    """Files as given, directories as their ``*.toml`` files (recursive, sorted), no repeats."""
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            candidates = sorted(
                p
                for p in path.rglob("*.toml")
                if not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not candidates:
                raise MemoryFileError("directory holds no .toml memory files", Location(path))
        else:
            candidates = [path]
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                out.append(candidate)
    return out


def load_memory_set(paths: Sequence[Path | str], registry: Any | None = None) -> MemorySet:
    """Load files and directories into one set; memory names must be unique across it."""
    files = [read_memory_file(p, registry) for p in expand_paths(paths)]
    _check_unique(entry for f in files for entry in f.entries)
    memory_set = MemorySet(tuple(files))
    memory_set.model_info()  # files must agree on [model]
    return memory_set


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a loaded model that memory files are checked against."""

    n_layers: int
    n_heads: int
    d_model: int
    d_vocab: int
    n_ctx: int


def check_against_model(memory_set: MemorySet, dims: ModelDims) -> None:
    """Ranges and widths that need a model: layers, heads, positions, the [model] table."""
    for f in memory_set.files:
        if f.model is not None:
            for key in ("d_model", "n_layers", "n_heads", "d_vocab"):
                declared = getattr(f.model, key)
                actual = getattr(dims, key)
                if declared is not None and declared != actual:
                    raise MemoryFileError(
                        f"[model] {key} = {declared} but the loaded model has {actual}",
                        Location(
                            f.path,
                            field_line(_read_text(f.path), None, key, table="model"),
                            None,
                            f"model.{key}",
                        ),
                    )
    for entry in memory_set.entries:
        memory: MemoryBase = entry.memory
        if memory.layer >= dims.n_layers:
            raise entry.error(
                f"layer {memory.layer} is out of range; the model has {dims.n_layers} layers "
                f"(0–{dims.n_layers - 1})",
                "layer",
            )
        head = getattr(memory, "head", None)
        if head is not None and head >= dims.n_heads:
            raise entry.error(
                f"head {head} is out of range; the model has {dims.n_heads} heads "
                f"(0–{dims.n_heads - 1})",
                "head",
            )
        if isinstance(memory.positions, list):
            bad = [p for p in memory.positions if not -dims.n_ctx <= p < dims.n_ctx]
            if bad:
                raise entry.error(
                    f"position {bad[0]} is outside the model's context of {dims.n_ctx}",
                    "positions",
                )
