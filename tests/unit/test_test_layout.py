"""The test tree itself: pytest imports test modules by basename (no packages under
tests/), so two files with one name in different tiers stop the whole run at
collection ("import file mismatch") — and only when both tiers are collected together,
which a tier run alone never shows."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_a_name_of_its_own() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        if "__pycache__" not in path.parts:
            where[path.name].append(str(path.relative_to(TESTS)))
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert shared == {}
