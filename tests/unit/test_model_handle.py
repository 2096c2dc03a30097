"""The model handle's one rules, without a model: BOS, dtype names, coordinates."""

from __future__ import annotations

import pytest
import torch

from meminject.dtypes import DTYPES, dtype_name, resolve_dtype
from meminject.errors import BadInputError
from meminject.model_handle import COORDINATES, BosRule, check_coordinates


@pytest.mark.parametrize(
    ("rule", "files", "expected"),
    [
        (BosRule(), None, True),  # TransformerLens's default
        (BosRule(convention=False), None, False),  # the source's convention
        (BosRule(files=True, convention=False), None, True),  # the set given at load
        (BosRule(files=True, convention=False), False, False),  # the set a prompt runs with
        (BosRule(asked=True, files=False, convention=False), False, True),  # asked wins
        (BosRule(asked=False), True, False),
    ],
)
def test_the_bos_rule_takes_the_first_answer(
    rule: BosRule, files: bool | None, expected: bool
) -> None:
    assert rule.resolve(files=files) is expected


def test_dtype_names_round_trip() -> None:
    for name in DTYPES:
        assert dtype_name(resolve_dtype(name)) == name
    assert resolve_dtype(None) is torch.float32
    with pytest.raises(BadInputError, match="unknown dtype 'float8'; choose one of float32"):
        resolve_dtype("float8")


def test_coordinates_are_checked() -> None:
    assert [check_coordinates(c) for c in COORDINATES] == ["processed", "raw"]
    with pytest.raises(BadInputError, match="unknown coordinates 'folded'"):
        check_coordinates("folded")
