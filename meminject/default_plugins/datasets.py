"""Built-in dataset loaders, registered through the same hook as plugins' datasets.

``csv`` reads a CSV in the paper's columns (``obscure_sentence``, ``explicit_entity``,
``answer``, optional ``explicit_sentence``); ``toyworld`` reads the held-out two-hop
prompts that ship with the toyworld model. Both return :class:`~meminject.datasets.PromptRow`
rows, with strings exactly as the file has them (see :mod:`meminject.datasets`).

Files are read with the standard ``csv`` module rather than pandas, because pandas
turns answers such as ``NA`` (Namibia) or ``None`` into missing values.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meminject.datasets import PromptRow
from meminject.errors import BadInputError
from meminject.fsread import ReadRefused, read_regular
from meminject.hookspecs import hookimpl

#: Column names tried, in order, for each field when the caller maps none. The second
#: names are those of the paper's 2WikiMultiHop files (``multi_hop_100.csv``).
PROMPT_COLUMNS = ("obscure_sentence", "obscure_sent")
MEMORY_COLUMNS = ("explicit_entity",)
ANSWER_COLUMNS = ("answer",)
EXPLICIT_COLUMNS = ("explicit_sentence", "explicit_sent")

#: Largest dataset file read (bytes); the paper's largest CSV is well under 1 MiB.
MAX_CSV_BYTES = 256 << 20


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


@hookimpl
def register_datasets(register: Any) -> None:
    register("csv", load_csv, "A CSV in the paper's columns; pass its path as DATASET.")
    register(
        "toyworld",
        load_toyworld,
        "toyworld's held-out two-hop prompts with their bridge entities (ships with the model).",
    )
