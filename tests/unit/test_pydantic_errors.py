"""The one wording of validation errors (meminject.pydantic_errors), on real pydantic
errors from small models."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meminject.pydantic_errors import describe, field_path, first_error, ordered, path_parts


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reduce: str = "mean"
    scale: float = Field(1.0, gt=0)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    count: int = 0
    params: Inner = Inner()

    @field_validator("name")
    @classmethod
    def _short(cls, value: str) -> str:
        if len(value) > 5:
            raise ValueError("name must be at most 5 characters")
        return value


def errors(data: dict[str, Any]) -> list[Any]:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(data)
    return list(info.value.errors())


def test_an_unknown_key_comes_first_and_suggests_the_close_name() -> None:
    found = errors({"name": "a", "count": "x", "cuont": 1})
    assert found[0]["type"] != "extra_forbidden"  # pydantic lists the bad count first
    first = first_error(found)
    assert first["type"] == "extra_forbidden"
    assert ordered(found)[0] is first
    assert describe(first, known=Outer.model_fields) == "unknown key 'cuont'; did you mean 'count'?"


def test_an_unknown_key_lists_a_few_names_or_none() -> None:
    (err,) = errors({"name": "a", "params": {"zzz": 1}})
    assert field_path(err["loc"]) == "params.zzz"
    assert (
        describe(err, known=Inner.model_fields, noun="option", owner="encoder 'pooled'")
        == "unknown option 'zzz' for encoder 'pooled'; it takes reduce, scale"
    )
    many = [f"k{i}" for i in range(20)]
    assert describe(err, known=many) == "unknown key 'zzz'"


def test_missing_and_table_sentences() -> None:
    (missing,) = errors({})
    assert describe(missing) == "required field is missing"
    assert describe(missing, noun="option") == "required option is missing"
    (table,) = errors({"name": "a", "params": 3})
    assert describe(table) == "must be a table, got 3"


def test_pydantic_messages_get_the_value_a_validator_keeps_its_words() -> None:
    (gt,) = errors({"name": "a", "params": {"scale": -2}})
    assert describe(gt) == "Input should be greater than 0, got -2"
    (own,) = errors({"name": "toolong"})
    assert describe(own) == "name must be at most 5 characters"


def test_union_labels_leave_paths() -> None:
    assert path_parts(["memory", 0, "literal['all','last']", "positions"]) == [
        "memory",
        0,
        "positions",
    ]
    assert field_path(["reduce"], prefix=("params",)) == "params.reduce"
