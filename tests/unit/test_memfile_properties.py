"""Property tests and the fuzz run of the memory-file loader: whatever the bytes, the loader
either returns a valid set or raises the project's own error, with a one-line message.

The fuzz run is the same test with many more examples:
    python -m pytest tests/unit/test_memfile_properties.py --hypothesis-profile=fuzz
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meminject.errors import MemoryFileError
from meminject.loading import load_memories

KEYS = [
    "name",
    "text",
    "layer",
    "tau",
    "τ",
    "head",
    "site",
    "encoding",
    "positions",
    "enabled",
    "strategy",
    "tensors",
    "boundary",
    "hardness",
    "params",
    "taux",
    "Name",
]
SCALARS = st.one_of(
    st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "attn_out",
            "attn_result",
            "unembed",
            "embed",
            "layer",
            "last",
            "gated",
            "add",
            "all",
            "m.safetensors",
            "../x",
            "/etc/passwd",
        ]
    ),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(st.integers(-40, 40), max_size=4),
    st.dictionaries(st.sampled_from(["scale", "x"]), SCALARS, max_size=2),
)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


@st.composite
def memory_documents(draw: st.DrawFn) -> str:
    lines = []
    if draw(st.booleans()):
        lines.append(f"version = {toml_value(draw(st.one_of(st.just(1), SCALARS)))}")
    if draw(st.booleans()):
        lines.append("[model]")
        for key in draw(
            st.lists(
                st.sampled_from(
                    ["name", "d_model", "n_layers", "coordinates", "fingerprint", "width"]
                ),
                unique=True,
                max_size=3,
            )
        ):
            lines.append(f'"{key}" = {toml_value(draw(SCALARS))}')
    for _ in range(draw(st.integers(0, 3))):
        lines.append("[[memory]]")
        for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=8)):
            lines.append(f'"{key}" = {toml_value(draw(VALUES))}')
    return "\n".join(lines) + "\n"


def check(path: Path) -> None:
    try:
        memory_set = load_memories([path])
    except MemoryFileError as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert message.startswith(str(path))
    else:
        assert len(memory_set) >= 1


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=memory_documents())
def test_structured_documents_load_or_fail_cleanly(tmp_path: Path, document: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(document, encoding="utf-8")
    check(path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_load_or_fail_cleanly(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "m.toml"
    path.write_bytes(data)
    check(path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=memory_documents(), cut=st.integers(0, 400))
def test_truncated_documents_load_or_fail_cleanly(tmp_path: Path, document: str, cut: int) -> None:
    path = tmp_path / "m.toml"
    path.write_text(document[:cut], encoding="utf-8")
    check(path)


VALID = {"name": "m", "text": "Paris", "layer": 1, "tau": 2.0}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    drop=st.sets(st.sampled_from(sorted(VALID)), max_size=2),
    extra=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3),
)
def test_mutations_of_a_valid_memory(tmp_path: Path, drop: set[str], extra: dict) -> None:
    fields = {k: v for k, v in VALID.items() if k not in drop} | extra
    lines = ["version = 1", "[[memory]]", *(f'"{k}" = {toml_value(v)}' for k, v in fields.items())]
    path = tmp_path / "m.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check(path)
    if not drop and not extra:  # the unmutated memory is valid
        assert len(load_memories([path])) == 1
