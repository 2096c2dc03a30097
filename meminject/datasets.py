"""Datasets for ``meminject sweep``: the row type, and resolving a dataset by name or file.

A row is a multi-hop prompt (the paper's ``obscure_sentence``), the memory that should
help with it (``explicit_entity``: the bridge entity the model fails to recall), the
answer, and optionally the explicit prompt (the same question with the entity named).

Strings are kept exactly as the file has them. In particular answers are stored
without the leading space they have as a continuation of the prompt ("Rome", not
" Rome"); :mod:`meminject.sweep` handles that when it tokenizes (the answer's tokens
are the continuation of ``prompt + " " + answer`` after the prompt), so no CSV ever
needs editing and the same file works for tokenizers with and without a space marker.

Loaders are registered through the ``register_datasets`` hook like any plugin's, so
``meminject sweep NAME`` resolves built-in and third-party datasets the same way; the
built-in ones (``csv``, the paper's CSV format, and ``toyworld``) are in
:mod:`meminject.default_plugins.datasets`.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError, MeminjectError, PluginError
from meminject.pydantic_errors import describe, field_path, first_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from meminject.plugins import DatasetEntry, Registry


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
        error = first_error(exc.errors())
        key = field_path(error["loc"]) or "?"
        reason = describe(error, known=entry.options_model.model_fields, noun="option")
        if error["type"] == "missing":
            reason += " (pass -D KEY=VALUE)"
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
