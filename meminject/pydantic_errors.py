"""pydantic's validation errors in meminject's words: the one formatter every reader uses.

Memory files, encoder parameters (in files and in sweep encoding labels), dataset
options, prompt files and the server's request bodies are all validated by pydantic
models. Each reports the *first* problem (an unknown key before anything else: a typo
explains the errors that follow from it) at its dotted path, in one sentence:

- an unknown key: ``unknown key 'tua'; did you mean 'tau'?`` (the noun is the reader's:
  "key" for TOML, "field" for JSON bodies);
- a missing one: ``required field is missing``;
- a scalar where a table belongs: ``must be a table, got 3``;
- anything else: pydantic's message without its "Value error, " prefix; after
  pydantic's own messages (not a validator's, which say what they mean to) the value
  given, when it is a scalar (``Input should be greater than 0, got -1``).

Readers add their own context around it (the file and memory, the request parameter);
they never reword pydantic's messages themselves.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meminject.errors import echo, shorten

#: pydantic error types that mean "a table was expected".
_TABLE_TYPES = ("model_type", "dict_type", "model_attributes_type")
#: Errors raised by a validator's own code, whose sentence says what it means to.
_OWN_WORDS = ("value_error", "assertion_error")
#: Keys longer than this get no "did you mean" (difflib is quadratic in their length).
_MAX_SUGGEST = 100


def first_error(errors: Iterable[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The problem to report: the first unknown key if there is one, else the first."""
    listed = list(errors)
    return min(listed, key=lambda e: e["type"] != "extra_forbidden")


def ordered(errors: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Every problem, unknown keys first (a reader that lists them all)."""
    return sorted(errors, key=lambda e: e["type"] != "extra_forbidden")


def path_parts(loc: Sequence[Any]) -> list[Any]:
    """A location's keys and indices, without the labels of union branches
    (``literal['all','last']``): no TOML or JSON path holds brackets."""
    return [p for p in loc if not (isinstance(p, str) and "[" in p)]


def field_path(loc: Sequence[Any], prefix: Sequence[Any] = ()) -> str:
    """A location as a dotted path (``params.reduce``, ``messages.0.role``)."""
    return ".".join(str(p) for p in path_parts([*prefix, *loc]))


def suggestion(given: Any, known: Iterable[str]) -> str | None:
    """The known name closest to ``given``, when one is close."""
    if not isinstance(given, str) or len(given) >= _MAX_SUGGEST:
        return None
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


#: An unknown key's sentence lists the names it could have been when there are at most
#: this many (an encoder's parameters, a dataset's options), not a whole file format's.
MAX_LISTED = 8


def describe(
    error: Mapping[str, Any],
    *,
    known: Iterable[str] = (),
    noun: str = "key",
    owner: str | None = None,
) -> str:
    """One problem as a sentence (see the module's docstring).

    ``known``: the names an unknown key may have meant: the sentence ends in "did you
    mean 'x'?" when one is close, else lists them when there are few (:data:`MAX_LISTED`).
    ``noun``: what the reader calls a key ("key", "field", "option"). ``owner``: whose
    keys they are (``encoder 'pooled'``), named in the unknown-key and missing sentences.
    """
    kind = error["type"]
    loc = error.get("loc", ())
    whose = f" for {owner}" if owner else ""
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        text = f"unknown {noun} '{shorten(key)}'{whose}"
        names = sorted(known)
        close = suggestion(key, names)
        if close is not None:
            return f"{text}; did you mean '{close}'?"
        if 0 < len(names) <= MAX_LISTED:
            return f"{text}; it takes {', '.join(names)}"
        return text
    if kind == "missing":
        return f"required {noun if noun != 'key' else 'field'} is missing{whose}"
    if kind in _TABLE_TYPES:
        return f"must be a table, got {echo(error.get('input'))}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind not in _OWN_WORDS and "input" in error and not isinstance(error["input"], (dict, list)):
        message = f"{message}, got {echo(error['input'])}"
    return message
