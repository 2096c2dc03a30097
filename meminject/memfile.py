"""Memory files → validated memory sets, with errors that point at file, memory, field, line.

tomllib gives a line only for syntax errors; for validation errors the line is
found by scanning the source for the memory's ``[[memory]]`` header and the key
inside its block. That is a heuristic (inline-table arrays get no line), which is
fine: the line is a convenience, the file/memory/field triple is the contract.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ValidationError

from meminject.errors import BadInputError, Location, MemoryFileError, echo, shorten
from meminject.fsread import FS_ERRORS, ReadRefused, fs_reason, read_regular
from meminject.pydantic_errors import describe, ordered, path_parts, suggestion
from meminject.schema import FORMAT_VERSION, NAME_PATTERN, FieldValueError, MemoryBase, ModelInfo

if TYPE_CHECKING:
    from meminject.model_handle import ModelDims

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Largest memory file read, in bytes. Memory files are small; a larger one is a mistake
#: or an attack, and reading it would only waste memory.
MAX_FILE_BYTES = 1 << 20

#: Deepest nesting of arrays and inline tables (of arrays and objects in JSON) read. The
#: parsers recurse once per level; a real file nests three or four levels.
MAX_NESTING = 64
#: Most parts of one dotted key (``a.b.c`` has three); tomllib's time grows with their square.
MAX_KEY_PARTS = 64
#: Most problems listed for one file by :func:`memory_set_problems`.
MAX_PROBLEMS_PER_FILE = 1000
#: Longest key whose line is looked up (a longer one is reported at its memory's header).
MAX_LOOKUP_KEY = 1000

_HEADER = re.compile(r"^\s*\[\[\s*memory\s*\]\]\s*(#.*)?$")
_TABLE = re.compile(r"^\s*\[")
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")


_TOML_SPECIAL = re.compile(r"[\"'#\[\]{}.=,\n]")
_JSON_SPECIAL = re.compile(r'["\[\]{}]')
_BASIC_END = re.compile(r'\\.|["\n]')  # an escape, or what ends a one-line "string"
_ML_BASIC_END = re.compile(r'\\.|"""', re.DOTALL)
_LITERAL_END = re.compile(r"['\n]")


def _string_end(text: str, start: int, quote: str, *, toml: bool) -> int:
    """Index just past the string whose opening ``quote`` ends at ``start`` (the text's
    end if it is never closed; a one-line string also ends before a newline)."""
    n = len(text)
    if toml and text.startswith(quote * 2, start):  # a multi-line string
        if quote == '"':
            pos = start + 2
            while (match := _ML_BASIC_END.search(text, pos)) is not None:
                pos = match.end()
                if match.group() == '"""':
                    break
            else:
                return n
        else:
            close = text.find("'''", start + 2)
            if close < 0:
                return n
            pos = close + 3
        extra = 0  # up to two quotes may end the content right before the delimiter
        while extra < 2 and text.startswith(quote, pos):
            pos, extra = pos + 1, extra + 1
        return pos
    if quote == "'":
        match = _LITERAL_END.search(text, start)
        return n if match is None else (match.end() if match.group() == "'" else match.start())
    pos = start
    while (match := _BASIC_END.search(text, pos)) is not None:
        if match.group() == '"':
            return match.end()
        if match.group() == "\n":
            return match.start()
        pos = match.end()
    return n


def structure_problem(text: str, *, toml: bool = True) -> tuple[str, int] | None:
    """What makes ``text`` too deep to hand to a parser, and at which 1-based line: arrays
    and inline tables (JSON arrays and objects) nested deeper than :data:`MAX_NESTING`, or
    a dotted key of more than :data:`MAX_KEY_PARTS` parts. ``None`` when it is fine.

    tomllib and json recurse once per level (a few thousand levels raise RecursionError)
    and tomllib takes time quadratic in a dotted key's parts, so this linear scan runs
    first. Strings and comments are skipped; nothing else of the syntax is checked."""
    brackets = text.count("[") + text.count("{")
    if brackets <= MAX_NESTING and (not toml or text.count(".") < MAX_KEY_PARTS):
        return None
    special = _TOML_SPECIAL if toml else _JSON_SPECIAL
    depth = 0
    parts = 1
    pos = 0
    while (match := special.search(text, pos)) is not None:
        char = match.group()
        pos = match.end()
        if char in "[{":
            depth += 1
            parts = 1
            if depth > MAX_NESTING:
                what = "arrays and objects" if not toml else "arrays and inline tables"
                return (
                    f"{what} nest deeper than {MAX_NESTING} levels",
                    text.count("\n", 0, match.start()) + 1,
                )
        elif char in "]}":
            depth = max(depth - 1, 0)
            parts = 1
        elif char in "\"'":
            pos = _string_end(text, pos, char, toml=toml)
        elif char == "#":
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end
        elif char == ".":
            parts += 1
            if parts > MAX_KEY_PARTS:
                return (
                    f"a dotted key has more than {MAX_KEY_PARTS} parts",
                    text.count("\n", 0, match.start()) + 1,
                )
        else:  # "=", "," or a newline: a new key or value starts
            parts = 1
    return None


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
        line = field_line(self.source, self.index, field)
        return Location(self.file, line, f"'{self.name}'", field)

    def error(self, message: str, field: str | None = None) -> MemoryFileError:
        return MemoryFileError(message, self.location(field))


@dataclass(frozen=True)
class LoadedFile:
    path: Path
    model: ModelInfo | None
    entries: tuple[MemoryEntry, ...]


class UnknownMemoryError(BadInputError, KeyError):
    """A name that is not a memory of the set (a server answers ``unknown_memory``)."""

    def __str__(self) -> str:
        return BadInputError.__str__(self)


@dataclass(frozen=True)
class MemoryChoice:
    """One memory of a loaded set picked for one use, with its τ or ``enabled`` changed
    for that use only (None keeps the file's)."""

    name: str
    tau: float | None = None
    enabled: bool | None = None


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

    def subset(self, names: Sequence[str]) -> MemorySet:
        """The set with only the memories named (each must exist), files kept in order."""
        wanted = set(names)
        unknown = sorted(wanted - {entry.name for entry in self.entries})
        if unknown:
            raise KeyError(unknown[0])
        return MemorySet(
            tuple(
                LoadedFile(f.path, f.model, tuple(e for e in f.entries if e.name in wanted))
                for f in self.files
            )
        )

    def choose(self, choices: Sequence[MemoryChoice]) -> MemorySet:
        """The memories chosen, each with its overrides applied, files kept in order: what
        a request to a server (or a script) runs with. An unknown name is an
        :class:`UnknownMemoryError` naming the loaded ones; a τ for a memory without one
        (a gated memory) is a :class:`BadInputError`.

        A name chosen twice is refused rather than resolved: with two overrides of one
        memory there is no right answer to pick, and a server that took either would
        let the order of a list decide a request's output (and let one request of
        10,000 copies of a name cost 10,000 compilations). So a list longer than the
        set is refused before it is looked at."""
        known = {entry.name for entry in self.entries}
        if len(choices) > len(known):
            raise BadInputError(
                f"{len(choices)} memories were chosen, but the set has only {len(known)}; "
                "name each memory at most once"
            )
        seen: set[str] = set()
        for choice in choices:
            if choice.name not in known:
                listed = shorten(", ".join(sorted(known)) or "none are loaded", 1000)
                raise UnknownMemoryError(
                    f"unknown memory '{shorten(choice.name)}' (loaded: {listed})"
                )
            if choice.name in seen:
                raise BadInputError(
                    f"memory '{shorten(choice.name)}' is chosen twice; name each memory "
                    "at most once"
                )
            seen.add(choice.name)
        by_name = {choice.name: choice for choice in choices}
        files = []
        for loaded in self.subset(list(by_name)).files:
            entries = []
            for entry in loaded.entries:
                choice = by_name[entry.name]
                update: dict[str, Any] = {}
                if choice.tau is not None:
                    if not hasattr(entry.memory, "tau"):
                        raise BadInputError(
                            f"memory '{entry.name}' is a {entry.memory.strategy} memory and "
                            "has no tau"
                        )
                    update["tau"] = choice.tau
                if choice.enabled is not None:
                    update["enabled"] = choice.enabled
                memory = entry.memory.model_copy(update=update) if update else entry.memory
                entries.append(dataclasses.replace(entry, memory=memory))
            files.append(dataclasses.replace(loaded, entries=tuple(entries)))
        return MemorySet(tuple(files))

    def choice_key(self) -> tuple[tuple[str, float | None, bool], ...]:
        """What tells two choices of one loaded set apart once overrides are applied:
        each memory's name with its effective τ (None for memories without one) and
        ``enabled``, sorted by name. Two requests that run the same memories the same
        way share the key whatever order or spelling they chose them in (``"paris"``
        and ``{"name": "paris", "tau": <the file's τ>}``), so a server can cache
        compiled hooks by it. It identifies a choice only among subsets of one loaded
        set: the memories' other fields are not part of it."""
        return tuple(
            sorted(
                (entry.name, getattr(entry.memory, "tau", None), bool(entry.memory.enabled))
                for entry in self.entries
            )
        )

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
                        f"[model] {key} = {echo(b)} disagrees with {echo(a)} in {first_path}",
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


@functools.lru_cache(maxsize=8)
def _layout(source: str) -> tuple[list[str], list[int]]:
    """A source's lines and the indices of its ``[[memory]]`` headers, computed once per
    source: a file with thousands of problems must not be rescanned for each."""
    lines = source.splitlines()
    return lines, [i for i, line in enumerate(lines) if _HEADER.match(line)]


def field_line(
    source: str, memory_index: int | None, key: str | None, table: str | None = None
) -> int | None:
    """1-based line of ``key`` inside the ``memory_index``-th ``[[memory]]`` block (or of
    the block's header when the key is not written there), or of ``key`` in ``[table]``."""
    lines, headers = _layout(source)
    start = end = None
    if memory_index is not None:
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
    if key is not None and len(key) <= MAX_LOOKUP_KEY:
        first, _, rest = key.partition(".")
        key_re = _key_line(first)
        for i in range(start + 1, end):
            if key_re.match(lines[i]):
                return i + 1  # ``first = …``, an inline table when ``rest`` is given
        sub = re.compile(rf"^\s*\[\s*memory\.{re.escape(first)}\s*\]")
        for i in range(start + 1, end):
            if sub.match(lines[i]):
                if rest:  # the key inside ``[memory.first]``, up to the next table
                    inner = _key_line(rest.split(".")[0])
                    for j in range(i + 1, end):
                        if _TABLE.match(lines[j]):
                            break
                        if inner.match(lines[j]):
                            return j + 1
                return i + 1
    return start + 1 if start >= 0 else None


def _key_line(key: str) -> re.Pattern[str]:
    """A line assigning ``key`` (bare or quoted)."""
    return re.compile(rf"^\s*([\"']?){re.escape(key)}\1\s*=")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


class FileRegistry(Protocol):
    """What reading memory files needs of the plugin registry: the file model assembled
    from the registered strategies and encoders, and their names for suggestions.
    :class:`meminject.plugins.Registry` is one; the entry points that take no registry
    (:func:`meminject.loading.load_memories`, the CLI) pass the default one."""

    @property
    def file_model(self) -> type[BaseModel]: ...

    @property
    def strategies(self) -> Mapping[str, Any]: ...

    @property
    def encoders(self) -> Mapping[str, Any]: ...

    def plugins_off_note(self) -> str: ...


def _known_keys(registry: FileRegistry) -> list[str]:
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


def _plugins_off(registry: FileRegistry) -> str:
    return registry.plugins_off_note()


def _describe(err: dict[str, Any], registry: FileRegistry) -> str:
    """The file-specific sentences (a key given twice under its alias, an unknown
    strategy, encoding or version); the rest in the shared words."""
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        known = _known_keys(registry)
        if loc and str(loc[-1]) in known:
            return f"key '{loc[-1]}' repeats a field already given under another name"
        return describe(err, known=known)
    if kind == "unknown_strategy":
        return (
            f"unknown strategy {echo(err['input'].get('strategy'))}; registered: "
            + ", ".join(registry.strategies)
            + _plugins_off(registry)
        )
    if kind == "literal_error" and loc and loc[-1] == "encoding":
        given = err["input"]
        close = suggestion(given, registry.encoders)
        hint = f"did you mean '{close}'? " if close else ""
        return (
            f"unknown encoding {echo(given)}; {hint}registered: "
            + ", ".join(registry.encoders)
            + _plugins_off(registry)
        )
    if kind == "literal_error" and loc == ("version",):
        return (
            f"unsupported version {echo(err['input'])}; this meminject reads version "
            f"{FORMAT_VERSION}"
        )
    return describe(err)


def _location_of(
    err: dict[str, Any], path: Path, data: dict[str, Any], source: str, registry: FileRegistry
) -> Location:
    # Union branches show up in locations as labels like "literal['all','last']"; a
    # TOML path never contains brackets, so they are dropped.
    loc = path_parts(err["loc"])
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
        line = field_line(source, index, field)
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


def _refusal(refused: ReadRefused) -> str:
    if refused.kind == "missing":
        return refused.reason
    if refused.kind == "unreadable":
        return f"cannot read: {refused.reason}"
    if refused.kind == "not-regular":
        return "not a regular file"
    size = f"file is {refused.size} bytes, over" if refused.size is not None else "file is over"
    return f"{size} the {MAX_FILE_BYTES}-byte limit for memory files"


def _read_source(path: Path) -> str:
    """A memory file's text, or the one error that stops it from being parsed at all."""
    try:
        raw = read_regular(path, MAX_FILE_BYTES)
    except ReadRefused as refused:
        raise MemoryFileError(_refusal(refused), Location(path)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MemoryFileError(
            f"not UTF-8 text ({exc.reason} at byte {exc.start})", Location(path)
        ) from None


def _parse(path: Path) -> tuple[str, dict[str, Any]]:
    """Text and TOML data of a memory file, or the one error that stops it."""
    source = _read_source(path)
    problem = structure_problem(source)
    if problem is not None:
        raise MemoryFileError(f"invalid TOML: {problem[0]}", Location(path, problem[1]))
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        match = _TOML_LINE.search(text)
        line = int(match.group(1)) if match else None
        reason = _TOML_LINE.sub("", text).strip()
        raise MemoryFileError(f"invalid TOML: {reason}", Location(path, line)) from None
    return source, data


def _validate(
    path: Path, registry: FileRegistry, limit: int | None = None
) -> tuple[LoadedFile | None, list[MemoryFileError], int]:
    """A file's validated contents, or its problems: at most ``limit`` of them as errors
    (all when ``None``), and how many there are. Unknown keys come first: a typo shows up
    twice, as an unknown key and a missing field, and the unknown key is the cause.
    Problems that stop parsing are raised."""
    source, data = _parse(path)
    return _validate_data(path, source, data, registry, limit)


def _validate_data(
    path: Path, source: str, data: dict[str, Any], registry: FileRegistry, limit: int | None = None
) -> tuple[LoadedFile | None, list[MemoryFileError], int]:
    try:
        validated: Any = registry.file_model.model_validate(data)
    except ValidationError as exc:
        errors = ordered(exc.errors())
        shown = errors if limit is None else errors[:limit]
        problems = [
            MemoryFileError(
                _describe(dict(e), registry), _location_of(dict(e), path, data, source, registry)
            )
            for e in shown
        ]
        return None, problems, len(errors)
    entries = tuple(
        MemoryEntry(memory, path, i, source, validated.model)
        for i, memory in enumerate(validated.memory)
    )
    duplicates = _duplicates(entries, limit=limit)
    return LoadedFile(path, validated.model, entries), duplicates, len(duplicates)


def read_memory_file(path: Path | str, registry: FileRegistry) -> LoadedFile:
    """Read and validate one memory file; the first problem is raised, with a count of the
    others (:func:`memory_set_problems` lists them all)."""
    loaded, problems, count = _validate(Path(path), registry, limit=1)
    if problems:
        first, more = problems[0], count - 1
        if more and loaded is None:
            raise MemoryFileError(
                f"{first.message} (and {more} more problem{'s' * (more > 1)})", first.location
            )
        raise first
    assert loaded is not None
    return loaded


#: What memories built in Python (not read from a file) are located at in errors.
PYTHON_SOURCE = "<python>"


def memories_from_tables(
    tables: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    registry: FileRegistry,
    model: Mapping[str, Any] | None = None,
) -> MemorySet:
    """A memory set from ``[[memory]]`` tables written as Python dicts, validated exactly
    as a file's (strategy, encoder ``params``, every field), so a script or notebook
    needs no file::

        memories_from_tables({"name": "m", "text": "Paris", "encoding": "pooled",
                              "params": {"reduce": "max"}, "layer": 1, "tau": 4.0})

    ``model`` is the optional ``[model]`` table. Errors name ``<python>``, the memory and
    the field. Relative tensor paths (gated memories) are relative to the working
    directory."""
    listed = [tables] if isinstance(tables, Mapping) else list(tables)
    if not all(isinstance(t, Mapping) for t in listed):
        raise MemoryFileError("each memory must be a table (a dict)", Location(PYTHON_SOURCE))
    data: dict[str, Any] = {"version": FORMAT_VERSION, "memory": [dict(t) for t in listed]}
    if model is not None:
        data["model"] = dict(model)
    path = Path(PYTHON_SOURCE)
    loaded, problems, count = _validate_data(path, "", data, registry, 1)
    if problems:
        more = count - 1
        first = problems[0]
        if more:
            raise MemoryFileError(
                f"{first.message} (and {more} more problem{'s' * (more > 1)})", first.location
            )
        raise first
    assert loaded is not None
    return MemorySet((loaded,))


def _duplicates(
    entries: Iterable[MemoryEntry], *, across_files: bool = False, limit: int | None = None
) -> list[MemoryFileError]:
    """A problem for each memory whose name an earlier one already has (with
    ``across_files``, only where the earlier one is in another file), at most ``limit``."""
    owner: dict[str, MemoryEntry] = {}
    problems: list[MemoryFileError] = []
    for entry in entries:
        if limit is not None and len(problems) >= limit:
            break
        if entry.name in owner:
            first = owner[entry.name]
            if across_files and first.file == entry.file:
                continue
            where = f"memory #{first.index + 1} of {first.file}"
            problems.append(entry.error(f"duplicate memory name, already used by {where}", "name"))
        else:
            owner[entry.name] = entry
    return problems


def _check_unique(entries: Iterable[MemoryEntry]) -> None:
    problems = _duplicates(entries, limit=1)
    if problems:
        raise problems[0]


def _expand_one(raw: Path | str) -> list[Path]:
    """One command-line path: a file as given, a directory as its memory files."""
    if isinstance(raw, str) and raw == "":
        raise MemoryFileError(
            "empty path (an unset shell variable?); name a memory file or directory"
        )
    path = Path(raw)
    try:
        info = path.stat()
    except FS_ERRORS as exc:
        reason = fs_reason(exc)
        if isinstance(exc, FileNotFoundError):
            return [path]  # read_memory_file says "no such file"
        raise MemoryFileError(f"cannot read: {reason}", Location(path)) from None
    if not stat.S_ISDIR(info.st_mode):
        return [path]
    found = _toml_files(path)
    if not found:
        raise MemoryFileError("directory holds no .toml memory files", Location(path))
    return found


def _toml_files(root: Path) -> list[Path]:
    """Every ``*.toml`` file under ``root``, sorted, hidden files and folders left out.

    Symbolic links to folders are not followed (as ``Path.rglob``). Nothing is skipped in
    silence: a folder that cannot be listed, a broken symbolic link or a link loop is an
    error, since it may hold memories the set would otherwise lack."""
    found: list[Path] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except FS_ERRORS as exc:
            raise MemoryFileError(
                f"cannot read directory: {fs_reason(exc)}", Location(folder)
            ) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                    continue
                if entry.is_symlink():
                    os.stat(path)  # a broken link or a loop raises
            except FS_ERRORS as exc:
                reason = fs_reason(exc)
                if isinstance(exc, FileNotFoundError):
                    reason = "broken symbolic link (its target does not exist)"
                raise MemoryFileError(f"cannot read: {reason}", Location(path)) from None
            if entry.name.endswith(".toml"):
                found.append(path)
    return sorted(found)


def _identity(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except FS_ERRORS:
        return path


def expand_paths(paths: Sequence[Path | str]) -> list[Path]:
    """Files as given, directories as their ``*.toml`` files (recursive, sorted), no repeats."""
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        for candidate in _expand_one(raw):
            key = _identity(candidate)
            if key not in seen:
                seen.add(key)
                out.append(candidate)
    return out


def load_memory_set(paths: Sequence[Path | str], registry: FileRegistry) -> MemorySet:
    """Load files and directories into one set; memory names must be unique across it."""
    files = [read_memory_file(p, registry) for p in expand_paths(paths)]
    _check_unique(entry for f in files for entry in f.entries)
    memory_set = MemorySet(tuple(files))
    memory_set.model_info()  # files must agree on [model]
    return memory_set


def memory_set_problems(
    paths: Sequence[Path | str], registry: FileRegistry
) -> list[MemoryFileError]:
    """Every problem :func:`load_memory_set` would stop at, not only the first: in the
    order of ``paths``, a path that cannot be expanded, a file that cannot be parsed, each
    validation error and repeated name of each file; then names repeated across files and
    ``[model]`` disagreements."""
    problems: list[MemoryFileError] = []
    loaded: list[LoadedFile] = []
    seen: set[Path] = set()
    for raw in paths:
        try:
            candidates = _expand_one(raw)
        except MemoryFileError as exc:
            problems.append(exc)
            continue
        for candidate in candidates:
            key = _identity(candidate)
            if key in seen:
                continue
            seen.add(key)
            try:
                result, found, count = _validate(candidate, registry, MAX_PROBLEMS_PER_FILE)
            except MemoryFileError as exc:
                problems.append(exc)
                continue
            problems += found
            if count > len(found):
                problems.append(
                    MemoryFileError(
                        f"(and {count - len(found)} more problems, not listed)",
                        Location(candidate),
                    )
                )
            if result is not None:
                loaded.append(result)
    problems += _duplicates((entry for f in loaded for entry in f.entries), across_files=True)
    try:
        MemorySet(tuple(loaded)).model_info()
    except MemoryFileError as exc:
        problems.append(exc)
    return problems


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
