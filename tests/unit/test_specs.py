"""Value-list specs of the analysis commands: ranges, steps, lists, shards."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meminject.errors import BadInputError
from meminject.specs import (
    MAX_VALUES,
    parse_encoding_list,
    parse_float_spec,
    parse_int_spec,
    parse_shard,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-11", list(range(12))),
        ("0,3,5", [0, 3, 5]),
        ("0-11:2", [0, 2, 4, 6, 8, 10]),
        ("0-10:5", [0, 5, 10]),
        ("7", [7]),
        ("3, 1, 2", [3, 1, 2]),  # the order written is kept
        ("0-3,2-5", [0, 1, 2, 3, 4, 5]),  # repeats dropped
        (" 4 - 6 ", [4, 5, 6]),
    ],
)
def test_int_specs(spec, expected):
    assert parse_int_spec(spec) == expected


def test_all_expands_to_the_universe_given():
    assert parse_int_spec("all", universe=range(4)) == [0, 1, 2, 3]
    assert parse_int_spec("ALL", "head", universe=range(2)) == [0, 1]
    with pytest.raises(BadInputError, match="'all' is not available"):
        parse_int_spec("all")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty layer spec"),
        ("a", "cannot read"),
        ("1-2-3", "cannot read"),
        ("5-2", "runs backwards"),
        ("0-4:0", "step must be positive"),
        ("1.5", "not a whole number"),
        ("-1", "not a whole number"),
        ("0,,2", "cannot read"),
        (f"0-{MAX_VALUES + 5}", "more than"),
    ],
)
def test_bad_int_specs_are_errors(spec, message):
    with pytest.raises(BadInputError, match=message):
        parse_int_spec(spec)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1,2,4,8", [1.0, 2.0, 4.0, 8.0]),
        ("0.5-8:0.5", [0.5 * i for i in range(1, 17)]),
        ("0.1-0.3:0.1", [0.1, 0.2, 0.3]),
        ("1-3", [1.0, 2.0, 3.0]),
        ("0-1:0.4", [0.0, 0.4, 0.8]),  # the end is included only when the step lands on it
        ("-2--1:0.5", [-2.0, -1.5, -1.0]),
        ("-0", [0.0]),
        (".5,2.", [0.5, 2.0]),
    ],
)
def test_float_specs(spec, expected):
    assert parse_float_spec(spec) == expected


def test_float_ranges_land_exactly_on_decimal_steps():
    values = parse_float_spec("0.1-0.3:0.1")
    assert values[-1] == 0.3  # not 0.30000000000000004


@pytest.mark.parametrize("spec", ["x", "1-", "2-1", "0-1:0", "1e3", "nan"])
def test_bad_float_specs_are_errors(spec):
    with pytest.raises(BadInputError):
        parse_float_spec(spec)


@given(
    st.integers(0, 300),
    st.integers(0, 300),
    st.integers(1, 40),
)
def test_int_ranges_match_python_range(a, length, step):
    b = a + length
    assert parse_int_spec(f"{a}-{b}:{step}") == list(range(a, b + 1, step))


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=30))
def test_int_lists_round_trip_without_repeats(values):
    assert parse_int_spec(",".join(map(str, values))) == list(dict.fromkeys(values))


@given(st.integers(-50, 50), st.integers(0, 40), st.sampled_from([0.25, 0.5, 1.0, 2.5]))
def test_float_ranges_include_both_ends_on_the_grid(a_quarters, n, step):
    a = a_quarters / 4
    b = a + n * step
    values = parse_float_spec(f"{a}-{b}:{step}")
    assert len(values) == n + 1
    assert values[0] == a + 0.0 and values[-1] == pytest.approx(b)


def test_encoding_lists_drop_repeats():
    assert parse_encoding_list("unembed, embed,unembed") == ["unembed", "embed"]
    with pytest.raises(BadInputError, match="empty encoding list"):
        parse_encoding_list(" , ")


@pytest.mark.parametrize(
    ("spec", "expected"), [("0/1", (0, 1)), ("2/4", (2, 4)), (" 3 / 8 ", (3, 8))]
)
def test_shards(spec, expected):
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["1/1", "4/4", "0/0", "-1/2", "a/b", "1"])
def test_bad_shards_are_errors(spec):
    with pytest.raises(BadInputError):
        parse_shard(spec)
