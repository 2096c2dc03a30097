"""Memory sets without a model: reading with an explicit registry, the overrides a
request or a script picks (``MemorySet.choose``), and the writer beside the reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from meminject.errors import BadInputError
from meminject.memfile import MemoryChoice, UnknownMemoryError, load_memory_set
from meminject.memfile_writer import memory_file_text, toml_value
from meminject.plugins import build_registry
from tests.conftest import write

TWO = """version = 1
[model]
name = "toyworld"

[[memory]]
name = "a"
text = "Rechelur"
layer = 1
tau = 4.0

[[memory]]
name = "b"
text = "Velor"
layer = 2
tau = 2.0
"""


@pytest.fixture(scope="module")
def registry():
    return build_registry(load_entrypoints=False)


def test_choose_applies_overrides_to_the_chosen_only(tmp_path: Path, registry) -> None:
    memory_set = load_memory_set([write(tmp_path / "two.toml", TWO)], registry)
    chosen = memory_set.choose([MemoryChoice("b", tau=-1.5), MemoryChoice("a", enabled=False)])
    assert [(e.name, e.memory.tau, e.memory.enabled) for e in chosen.entries] == [
        ("a", 4.0, False),
        ("b", -1.5, True),
    ]
    # The loaded set is untouched, and the [model] table travels with the choice.
    assert [(e.memory.tau, e.memory.enabled) for e in memory_set.entries] == [
        (4.0, True),
        (2.0, True),
    ]
    assert chosen.model_info() == memory_set.model_info()
    assert [e.name for e in memory_set.choose([MemoryChoice("b")]).entries] == ["b"]


def test_choose_refuses_unknown_names_and_tau_on_gated(tmp_path: Path, registry) -> None:
    memory_set = load_memory_set([write(tmp_path / "two.toml", TWO)], registry)
    with pytest.raises(UnknownMemoryError, match=r"unknown memory 'c' \(loaded: a, b\)"):
        memory_set.choose([MemoryChoice("c")])
    gated = load_memory_set(
        [
            write(
                tmp_path / "g" / "g.toml",
                'version = 1\n[[memory]]\nname = "g"\nstrategy = "gated"\nsite = "resid_pre"\n'
                'layer = 1\ntensors = "g.safetensors"\nboundary = 0.5\nhardness = 2.0\n',
            )
        ],
        registry,
    )
    with pytest.raises(BadInputError, match="memory 'g' is a gated memory and has no tau"):
        gated.choose([MemoryChoice("g", tau=1.0)])


def test_toml_values() -> None:
    assert toml_value(True) == "true"
    assert toml_value(3) == "3"
    assert toml_value(0.25) == "0.25"
    assert toml_value('a "b"\n') == '"a \\"b\\"\\n"'
    assert toml_value([1, "x"]) == '[1, "x"]'
    assert toml_value({"b": 1, "a": [True]}) == "{a = [true], b = 1}"


def test_what_the_writer_writes_reads_back(tmp_path: Path, registry) -> None:
    memory = {"name": "m", "text": 'Say "hi"\tthere', "layer": 1, "tau": 2.5, "head": None}
    text = memory_file_text(
        memory, model={"name": "toyworld", "prepend_bos": False}, header=["made here"]
    )
    assert text.startswith("# made here\nversion = 1\n\n[model]\n")
    path = write(tmp_path / "one.toml", text)
    (entry,) = load_memory_set([path], registry).entries
    assert (entry.name, entry.memory.text, entry.memory.tau) == ("m", 'Say "hi"\tthere', 2.5)
    assert load_memory_set([path], registry).model_info().prepend_bos is False
    # Appending keeps the file and adds the [model] table only where it has none.
    more = memory_file_text(
        {"name": "n", "text": "x", "layer": 0, "tau": 1.0},
        model={"name": "toyworld"},
        comments=["second"],
        existing=text,
        existing_has_model=True,
    )
    assert more.startswith(text) and more.count("[model]") == 1 and "# second\n" in more
    both = load_memory_set([write(tmp_path / "two.toml", more)], registry)
    assert [e.name for e in both.entries] == ["m", "n"]
