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


def test_choose_refuses_a_name_twice_and_lists_longer_than_the_set(
    tmp_path: Path, registry
) -> None:
    """Two overrides of one memory have no right answer (issue 26, items 3-5): refused,
    whatever the overrides, and a list longer than the set is refused before lookups."""
    memory_set = load_memory_set([write(tmp_path / "two.toml", TWO)], registry)
    for twice in (
        [MemoryChoice("a", tau=1.0), MemoryChoice("a", tau=2.0)],
        [MemoryChoice("a"), MemoryChoice("a", tau=2.0)],
        [MemoryChoice("a", enabled=False), MemoryChoice("a")],
    ):
        with pytest.raises(BadInputError, match="memory 'a' is chosen twice"):
            memory_set.choose(twice)
    with pytest.raises(BadInputError, match="10000 memories were chosen, but the set has only 2"):
        memory_set.choose([MemoryChoice("a")] * 10_000)


def test_choice_key_is_the_effective_choice(tmp_path: Path, registry) -> None:
    """Order and spelling do not matter, effective values do."""
    memory_set = load_memory_set([write(tmp_path / "two.toml", TWO)], registry)

    def key(*choices: MemoryChoice) -> object:
        return memory_set.choose(list(choices)).choice_key()

    assert key(MemoryChoice("a"), MemoryChoice("b")) == key(MemoryChoice("b"), MemoryChoice("a"))
    assert key(MemoryChoice("a")) == key(MemoryChoice("a", tau=4.0, enabled=True))
    assert key(MemoryChoice("a")) == (("a", 4.0, True),)
    assert key(MemoryChoice("a", tau=1.0)) != key(MemoryChoice("a", tau=2.0))
    assert key(MemoryChoice("a", enabled=False)) != key(MemoryChoice("a"))


def test_unknown_memory_errors_are_bounded(tmp_path: Path, registry) -> None:
    memory_set = load_memory_set([write(tmp_path / "two.toml", TWO)], registry)
    with pytest.raises(UnknownMemoryError) as caught:
        memory_set.choose([MemoryChoice("x" * 1_000_000)])
    assert len(str(caught.value)) < 400


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
