"""Choosing the boundary from a scored grid (docs/local-memories.md): best accuracy, widest run."""

from __future__ import annotations

import pytest

from meminject.learn import BoundaryRow, choose_boundary


def table(*pairs: tuple[float, float]) -> list[BoundaryRow]:
    return [BoundaryRow(b, 0, 0, acc) for b, acc in pairs]


def test_single_best() -> None:
    assert choose_boundary(table((0.1, 0.5), (0.2, 0.9), (0.3, 0.7))) == (0.2, 0.9)


def test_widest_run_wins_over_a_longer_list_of_narrow_points() -> None:
    rows = table((0.1, 1.0), (0.2, 0.5), (0.3, 1.0), (0.4, 1.0), (0.5, 0.5), (1.0, 1.0), (2.0, 1.0))
    # runs at 1.0: [0.1], [0.3-0.4], [1.0-2.0]; the last spans 1.0, centre 1.5.
    assert choose_boundary(rows) == (1.5, 1.0)


def test_equal_widths_take_the_first() -> None:
    rows = table((0.1, 1.0), (0.2, 1.0), (0.3, 0.0), (0.4, 1.0), (0.5, 1.0))
    assert choose_boundary(rows) == (pytest.approx(0.15), 1.0)
