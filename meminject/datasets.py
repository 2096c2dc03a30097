"""Datasets for ``meminject sweep``: the row type, the paper's CSV format, toyworld's set.

A row is a multi-hop prompt (the paper's ``obscure_sentence``), the memory that should
help with it (``explicit_entity``: the bridge entity the model fails to recall), the
answer, and optionally the explicit prompt (the same question with the entity named).

Strings are kept exactly as the file has them. In particular answers are stored
without the leading space they have as a continuation of the prompt ("Rome", not
" Rome"); :mod:`meminject.sweep` handles that when it tokenizes (the answer's tokens
are the continuation of ``prompt + " " + answer`` after the prompt), so no CSV ever
needs editing and the same file works for tokenizers with and without a space marker.

Files are read with the standard ``csv`` module rather than pandas, because pandas
turns answers such as ``NA`` (Namibia) or ``None`` into missing values.

Loaders are registered through the ``register_datasets`` hook like any plugin's, so
``meminject sweep NAME`` resolves built-in and third-party datasets the same way.
"""

from __future__ import annotations

import csv
import difflib
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError, MeminjectError, PluginError, echo
from meminject.fsread import ReadRefused, read_regular
from meminject.hookspecs import hookimpl

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from meminject.plugins import DatasetEntry, Registry

#: Column names tried, in order, for each field when the caller maps none. The second
#: names are those of the paper's 2WikiMultiHop files (``multi_hop_100.csv``).
PROMPT_COLUMNS = ("obscure_sentence", "obscure_sent")
MEMORY_COLUMNS = ("explicit_entity",)
ANSWER_COLUMNS = ("answer",)
EXPLICIT_COLUMNS = ("explicit_sentence", "explicit_sent")

#: Largest dataset file read (bytes); the paper's largest CSV is well under 1 MiB.
MAX_CSV_BYTES = 256 << 20


@dataclass(frozen=True)
class PromptRow:
    """One evaluation item.

    ``row_id`` is the row's 0-based position among the file's data rows; it is what
    ties a sweep's output rows back to the dataset, and it seeds the row's control
    memories, so it must not depend on sharding or batching.
    """

    prompt: str
    memory: str
    answer: str
    explicit_prompt: str | None = None
    row_id: int = 0


def _pick_column(
    header: Sequence[str], given: str | None, candidates: Sequence[str], path: Path, what: str
) -> str | None:
    if given is not None:
        if given not in header:
            raise BadInputError(
                f"{path}: column '{given}' (the {what}) is not in the file; it has "
                f"{', '.join(repr(h) for h in header)}"
            )
        return given
    for name in candidates:
        if name in header:
            return name
    return None


def load_csv(
    path: str | Path | None,
    *,
    prompt_column: str | None = None,
    memory_column: str | None = None,
    answer_column: str | None = None,
    explicit_column: str | None = None,
    limit: int | None = None,
) -> list[PromptRow]:
    """Read a CSV in the paper's format (``obscure_sentence``, ``explicit_entity``,
    ``answer``, optional ``explicit_sentence``; the 2WikiMultiHop names
    ``obscure_sent``/``explicit_sent`` too). ``*_column`` maps other names;
    ``limit`` keeps the first rows only.

    Missing files, missing columns and empty required cells raise
    :class:`~meminject.errors.BadInputError` naming the file (and line and column).
    """
    if path is None:
        raise BadInputError("the csv dataset needs a path: meminject sweep FILE.csv …")
    path = Path(path)
    if limit is not None and limit < 0:
        raise BadInputError("limit must be >= 0")
    try:
        raw = read_regular(path, MAX_CSV_BYTES)
    except ReadRefused as refused:
        raise BadInputError(f"{path}: {_refusal(refused)}") from None
    try:
        text = raw.decode("utf-8-sig")  # utf-8-sig: spreadsheet exports add a BOM
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    reader = _Records(path, text)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise BadInputError(f"{path}: the file is empty (no header row)") from None
    columns = {
        "prompt": _pick_column(header, prompt_column, PROMPT_COLUMNS, path, "prompt"),
        "memory": _pick_column(header, memory_column, MEMORY_COLUMNS, path, "memory"),
        "answer": _pick_column(header, answer_column, ANSWER_COLUMNS, path, "answer"),
    }
    candidates = {"prompt": PROMPT_COLUMNS, "memory": MEMORY_COLUMNS, "answer": ANSWER_COLUMNS}
    for what, column in columns.items():
        if column is None:
            raise BadInputError(
                f"{path}: missing column '{candidates[what][0]}' (the {what}); map another "
                f"column with --{what}-column"
            )
    explicit = _pick_column(header, explicit_column, EXPLICIT_COLUMNS, path, "explicit prompt")
    index = {name: header.index(name) for name in header}
    rows: list[PromptRow] = []
    for row_id, record in enumerate(reader):
        if limit is not None and len(rows) >= limit:
            break
        line = reader.line_num
        if len(record) != len(header):
            raise BadInputError(
                f"{path}:{line}: row has {len(record)} fields, the header has {len(header)}"
            )
        values: dict[str, str] = {}
        for what, column in columns.items():
            value = record[index[column]]  # type: ignore[index]
            if not value.strip():
                raise BadInputError(f"{path}:{line}: column '{column}' is empty")
            values[what] = value
        explicit_value = record[index[explicit]] if explicit is not None else None
        rows.append(
            PromptRow(
                prompt=values["prompt"],
                memory=values["memory"],
                answer=values["answer"],
                explicit_prompt=explicit_value or None,
                row_id=row_id,
            )
        )
    return rows


class _Records:
    """``csv.reader`` rows whose errors name the file, the line and the row.

    Fields are limited to ``csv.field_size_limit()`` characters, 131072 by default. The
    limit is left as it is (it is process-wide): a prompt, memory or answer that long is
    far beyond any model's context, so a longer field is refused, as one error naming
    the file and row, not the csv module's bare ``field larger than field limit``."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self._reader = csv.reader(io.StringIO(text, newline=""))
        self.rows = 0  # records returned so far, the header included

    @property
    def line_num(self) -> int:
        return self._reader.line_num

    def __iter__(self) -> _Records:
        return self

    def __next__(self) -> list[str]:
        try:
            record = next(self._reader)
        except csv.Error as exc:
            row = "the header" if self.rows == 0 else f"data row {self.rows}"
            limit = csv.field_size_limit()
            if "field larger than field limit" in str(exc):
                reason = f"a field is longer than {limit} characters, the most a field may hold"
            else:
                reason = f"malformed CSV ({exc})"
            raise BadInputError(f"{self.path}:{self._reader.line_num}: {row}: {reason}") from None
        self.rows += 1
        return record


def _refusal(refused: ReadRefused) -> str:
    if refused.kind == "missing":
        return "no such dataset file"
    if refused.kind == "unreadable":
        return f"cannot read the dataset: {refused.reason}"
    if refused.kind == "not-regular":
        return "not a regular file, so not a dataset file"
    return f"larger than {MAX_CSV_BYTES >> 20} MiB; refusing to read it"


def load_toyworld(path: str | Path | None = None, **options: Any) -> list[PromptRow]:
    """toyworld's held-out two-hop prompts (``meminject.toyworld.dataset_path()``), in the
    paper's columns; ``path`` may name another toyworld model directory or CSV."""
    from meminject import toyworld

    if path is None:
        csv_path = toyworld.dataset_path()
    else:
        given = Path(path)
        csv_path = toyworld.dataset_path(given) if given.is_dir() else given
    if not csv_path.is_file():
        raise BadInputError(
            f"{csv_path}: the toyworld dataset is missing; run python -m meminject.toyworld.train"
        )
    return load_csv(csv_path, **options)


def looks_like_path(spec: str) -> bool:
    """A dataset argument that names a file rather than a registered dataset."""
    return spec.lower().endswith(".csv") or "/" in spec or "\\" in spec or Path(spec).exists()


def dataset_target(spec: str, registry: Registry) -> tuple[str, str | None]:
    """Which registered loader reads ``spec``, and the path it gets (None: built in).

    In order: a registered name (``toyworld``); ``NAME:PATH`` for a registered NAME; a
    file whose suffix a loader claims (``rows.jsonl`` when a plugin registered
    ``suffixes=(".jsonl",)``); any other file, read by the built-in ``csv`` loader.
    """
    if spec in registry.datasets:
        return spec, None
    name, sep, path = spec.partition(":")
    if sep and name in registry.datasets:
        if not path:
            raise BadInputError(f"dataset '{spec}': give a path after '{name}:'")
        return name, path
    lowered = spec.lower()
    claims = sorted(
        (
            (len(suffix), entry.name)
            for entry in registry.datasets.values()
            for suffix in entry.suffixes
            if lowered.endswith(suffix.lower())
        ),
        reverse=True,
    )
    if claims:
        longest = [n for length, n in claims if length == claims[0][0]]
        if len(set(longest)) > 1:
            raise BadInputError(
                f"dataset '{spec}': loaders {', '.join(sorted(set(longest)))} all read such "
                "files; name one: NAME:PATH"
            )
        return longest[0], spec
    if looks_like_path(spec):
        return "csv", spec
    known = sorted(registry.datasets)
    close = difflib.get_close_matches(spec, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise BadInputError(
        f"unknown dataset '{spec}': not a registered dataset ({', '.join(known) or 'none'}) "
        f"nor a file{hint} (meminject datasets lists them)"
    )


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line; VALUE is read as a TOML value (``3``,
    ``true``, ``"a b"``, ``[1, 2]``), else kept as the string it is."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise BadInputError(f"option {text!r}: write KEY=VALUE")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def parse_options(texts: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` flags as a dict; a key given twice is an error, not the last one."""
    out: dict[str, Any] = {}
    for text in texts:
        key, value = parse_option(text)
        if key in out:
            raise BadInputError(f"option '{key}' is given twice")
        out[key] = value
    return out


def _checked_options(entry: DatasetEntry, given: dict[str, Any]) -> Any:
    """``given`` validated by the dataset's ``options_model``, as one clear error."""
    from pydantic import ValidationError

    assert entry.options_model is not None
    try:
        return entry.options_model.model_validate(given)
    except ValidationError as exc:
        error = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        key = ".".join(str(p) for p in error["loc"]) or "?"
        known = sorted(entry.options_model.model_fields)
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"it takes {', '.join(known)}"
            reason = f"unknown option; {hint}"
        elif error["type"] == "missing":
            reason = "required option is missing (pass -D KEY=VALUE)"
        else:
            reason = str(error["msg"]).removeprefix("Value error, ")
            if "input" in error and not isinstance(error["input"], (dict, list)):
                reason = f"{reason}, got {echo(error['input'])}"
        raise BadInputError(f"dataset '{entry.name}': option '{key}': {reason}") from None


def resolve_dataset(
    spec: str,
    registry: Registry | None = None,
    *,
    limit: int | None = None,
    options: dict[str, Any] | None = None,
    **column_options: Any,
) -> list[PromptRow]:
    """Rows of the dataset ``spec`` names (see :func:`dataset_target`), the first
    ``limit`` only if given.

    ``options`` (``-D KEY=VALUE``) and the column options (``prompt_column=…``; those
    left as None are not passed) go to the loader: validated by its ``options_model``
    and passed as ``options=`` when it declares one, else as keyword arguments, so a
    loader without a model need only accept the options its users give. Registered
    names win over files of the same name in the working directory; write
    ``./toyworld`` for such a file.
    """
    from meminject.plugins import get_registry

    registry = registry or get_registry()
    given = {key: value for key, value in column_options.items() if value is not None}
    for key, value in (options or {}).items():
        if key in given:
            raise BadInputError(f"option '{key}' is given twice")
        given[key] = value
    name, path = dataset_target(spec, registry)
    entry = registry.datasets[name]
    try:
        if entry.options_model is not None:
            rows = entry.loader(path, options=_checked_options(entry, given))
        else:
            rows = entry.loader(path, **given)
    except BadInputError as exc:
        if name == "csv" and path is not None and not path.lower().endswith(".csv"):
            raise BadInputError(
                f"{exc} (read as a CSV in the paper's columns; for another format name its "
                "loader, NAME:PATH; meminject datasets lists them)"
            ) from exc
        raise
    except TypeError as exc:
        if entry.options_model is None and given and "unexpected keyword" in str(exc):
            raise BadInputError(
                f"dataset '{name}' takes no option {', '.join(repr(k) for k in given)}"
            ) from exc
        raise PluginError(entry.plugin, f"dataset '{name}' failed: {exc!r}") from exc
    except MeminjectError:
        raise
    except Exception as exc:
        raise PluginError(entry.plugin, f"dataset '{name}' failed: {exc!r}") from exc
    if not isinstance(rows, list) or not all(isinstance(r, PromptRow) for r in rows):
        raise PluginError(
            entry.plugin, f"dataset '{name}': the loader did not return a list of PromptRow"
        )
    if limit is not None:
        if limit < 0:
            raise BadInputError("limit must be >= 0")
        rows = rows[:limit]
    ids = [r.row_id for r in rows]
    if len(set(ids)) != len(ids):
        raise PluginError(
            entry.plugin, f"dataset '{name}': row ids repeat; each row needs its own row_id"
        )
    return rows


@hookimpl
def register_datasets(register: Any) -> None:
    register("csv", load_csv, "A CSV in the paper's columns; pass its path as DATASET.")
    register(
        "toyworld",
        load_toyworld,
        "toyworld's held-out two-hop prompts with their bridge entities (ships with the model).",
    )
