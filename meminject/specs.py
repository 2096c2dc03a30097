"""Parsing the compact value lists the analysis commands take: ``0-11``, ``0,3,5``,
``0-11:2``, ``1,2,4,8``, ``0.5-8:0.5``, ``all``.

Why a grammar of its own instead of repeated flags: a sweep names dozens of layers and
τ values, and researchers write them the way the paper's figures are labelled (ranges
with a step). The parser is strict (a typo is an error, not a silently shorter sweep),
keeps the order the user wrote, drops repeats, and imports nothing heavy so ``--help``
and flag validation stay instant.

Grammar: a comma-separated list of items; an item is a number ``N``, or a range
``A-B`` (both ends included) with an optional step ``A-B:S``. Integer specs take
integers only; float specs (τ) also take decimals and negative numbers (``-1``,
``-2--1:0.5``). ``all`` means every value the caller offers (every layer or head).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from meminject.errors import BadInputError

#: The most values one spec may expand to; more is almost certainly a typo (``0-100000``).
MAX_VALUES = 10_000

_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
_ITEM = re.compile(rf"^(?P<a>{_NUMBER})(?:-(?P<b>{_NUMBER})(?::(?P<s>{_NUMBER}))?)?$")


def _items(spec: str, what: str) -> list[re.Match[str]]:
    text = spec.strip()
    if not text:
        raise BadInputError(f"empty {what} spec")
    out = []
    for raw in text.split(","):
        item = raw.strip().replace(" ", "")
        match = _ITEM.match(item)
        if match is None:
            raise BadInputError(
                f"cannot read {what} spec item {raw.strip()!r} in {spec!r} "
                "(expected N, A-B or A-B:STEP, comma-separated)"
            )
        out.append(match)
    return out


def _dedupe(values: Sequence[float]) -> list[float]:
    return list(dict.fromkeys(values))


def parse_int_spec(
    spec: str, what: str = "layer", *, universe: Sequence[int] | None = None
) -> list[int]:
    """Integers named by ``spec`` in the order written, each once.

    ``universe`` is what ``all`` expands to (e.g. ``range(n_layers)``); without it
    ``all`` is an error. Negative numbers are rejected: layers and heads count from 0.
    """
    if spec.strip().lower() == "all":
        if universe is None:
            raise BadInputError(f"'all' is not available for {what}s here")
        return list(universe)
    values: list[int] = []
    for match in _items(spec, what):
        parts = [match.group(k) for k in ("a", "b", "s")]
        for part in parts:
            if part is not None and not re.fullmatch(r"\d+", part):
                raise BadInputError(f"{what} spec {spec!r}: {part!r} is not a whole number >= 0")
        a = int(match.group("a"))
        if parts[1] is None:
            values.append(a)
            continue
        b = int(parts[1])
        step = int(parts[2]) if parts[2] is not None else 1
        if step <= 0:
            raise BadInputError(f"{what} spec {spec!r}: the step must be positive")
        if b < a:
            raise BadInputError(f"{what} spec {spec!r}: range {a}-{b} runs backwards")
        if (b - a) // step + 1 + len(values) > MAX_VALUES:
            raise BadInputError(f"{what} spec {spec!r} names more than {MAX_VALUES} values")
        values.extend(range(a, b + 1, step))
    return [int(v) for v in _dedupe(values)]


def parse_float_spec(spec: str, what: str = "tau") -> list[float]:
    """Floats named by ``spec`` (τ values), in the order written, each once.

    Range ends are included when the step lands on them up to rounding
    (``0.5-8:0.5`` gives 16 values ending in 8.0); values are rounded to 10
    decimals so ``0.1-0.3:0.1`` gives ``0.3`` and not ``0.30000000000000004``.
    The default step of a range is 1.
    """
    values: list[float] = []
    for match in _items(spec, what):
        a = float(match.group("a"))
        if match.group("b") is None:
            values.append(a)
            continue
        b = float(match.group("b"))
        step = float(match.group("s")) if match.group("s") is not None else 1.0
        if not step > 0:
            raise BadInputError(f"{what} spec {spec!r}: the step must be positive")
        if b < a:
            raise BadInputError(f"{what} spec {spec!r}: range {a:g}-{b:g} runs backwards")
        count = math.floor((b - a) / step + 1e-9) + 1
        if count + len(values) > MAX_VALUES:
            raise BadInputError(f"{what} spec {spec!r} names more than {MAX_VALUES} values")
        values.extend(round(a + i * step, 10) for i in range(count))
    for value in values:
        if not math.isfinite(value):
            raise BadInputError(f"{what} spec {spec!r}: {value} is not a finite number")
    return [v + 0.0 for v in _dedupe(values)]  # + 0.0 turns -0.0 into 0.0


def parse_encoding_list(spec: str) -> list[str]:
    """Comma-separated encoding labels, each once: ``unembed,pooled{reduce = "max",
    source = "embed"}``. Commas inside an inline table's braces or quotes do not split."""
    labels: list[str] = []
    depth, quote, start = 0, "", 0
    for i, char in enumerate(spec):
        if quote:
            if char == quote and spec[i - 1] != "\\":
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == "," and depth == 0:
            labels.append(spec[start:i])
            start = i + 1
    labels.append(spec[start:])
    names = [label.strip() for label in labels if label.strip()]
    if not names:
        raise BadInputError("empty encoding list")
    return list(dict.fromkeys(names))


def parse_shard(spec: str) -> tuple[int, int]:
    """``i/n`` → ``(i, n)`` with ``0 <= i < n``: this process takes rows ``i, i+n, i+2n …``.

    0-based, like the ranks of ``torchrun`` and ``accelerate launch``, so a launcher's
    rank variable can be passed straight through.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if match is None:
        raise BadInputError(f"cannot read shard {spec!r}; expected i/n, e.g. 0/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise BadInputError(f"shard {spec!r}: need 0 <= i < n (shards are numbered from 0)")
    return index, count
