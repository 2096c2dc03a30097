"""Writing memory files: the text :mod:`meminject.memfile` reads, made in one place.

``learn`` writes gated memories with it, and sweep encoding labels spell their
parameters with :func:`toml_value`, so what meminject writes always reads back through
the one reader (``learn`` validates the new text before it writes a byte).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from meminject.schema import FORMAT_VERSION


def toml_value(value: Any) -> str:
    """A TOML literal for ``value`` (bool, number, string, list, table), as meminject
    writes memory files and encoding labels."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in sorted(value.items())) + "}"
    return json.dumps(str(value), ensure_ascii=False)


def table_lines(values: Mapping[str, Any]) -> list[str]:
    """``key = value`` lines for a table's values, in order; None values are left out."""
    return [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None]


def memory_file_text(
    memory: Mapping[str, Any],
    *,
    model: Mapping[str, Any] | None = None,
    comments: Sequence[str] = (),
    existing: str = "",
    existing_has_model: bool = False,
    header: Sequence[str] = (),
    schema: str | None = None,
) -> str:
    """The text of a memory file holding ``memory`` (one ``[[memory]]`` table).

    ``existing``: the text of a file to append to (its tables are kept as they are);
    empty for a new file, which starts with a ``#:schema`` line when ``schema`` names
    the JSON Schema (editors validate against it), the ``header`` comments, the format
    version and ``model`` as its ``[model]`` table. A ``model`` table is added to an existing
    file only when it has none (``existing_has_model``). ``comments`` go right above the
    new ``[[memory]]`` table, one ``#`` line each."""
    lines: list[str] = []
    old = existing.rstrip() + "\n" if existing else ""
    if not old:
        if schema is not None:
            lines.append(f"#:schema {schema}")
        lines += [f"# {comment}" for comment in header]
        lines += [f"version = {FORMAT_VERSION}"]
        if model is not None:
            lines += ["", "[model]", *table_lines(model)]
    elif model is not None and not existing_has_model:
        lines += ["", "[model]", *table_lines(model)]
    lines.append("")
    lines += [f"# {comment}" for comment in comments]
    lines.append("[[memory]]")
    lines += table_lines(memory)
    return old + "\n".join(lines) + "\n"
