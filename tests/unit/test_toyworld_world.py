"""The toyworld generator: determinism, size, and a clean two-hop train/held-out split.

These tests need no torch: the world is pure Python, and a leak of held-out two-hop text
into training would silently invalidate every number measured on the shipped model.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from meminject.toyworld import WEIGHTS_DIR, dataset_path, load_world
from meminject.toyworld.world import (
    CSV_COLUMNS,
    DESCRIPTOR_RELATIONS,
    FORWARD_RELATIONS,
    RELATIONS,
    World,
    build_world,
)


@pytest.fixture(scope="module")
def world() -> World:
    return build_world()


def test_same_seed_gives_identical_world() -> None:
    a, b = build_world(seed=7), build_world(seed=7)
    assert a.to_json() == b.to_json()
    assert a.training_sentences() == b.training_sentences()
    assert a.dataset_csv() == b.dataset_csv()


def test_different_seed_gives_different_world() -> None:
    assert build_world(seed=1).countries != build_world(seed=2).countries


def test_at_least_150_distinct_entities(world: World) -> None:
    assert len(world.entities) >= 150
    assert len(set(world.entities)) == len(world.entities)
    # No entity name is a substring-word of another (prompts stay unambiguous).
    words = [w for e in world.entities for w in e.split()]
    assert len(set(words)) == len(words)


def test_facts_are_consistent(world: World) -> None:
    f = world.facts
    for rel in RELATIONS:
        assert f[rel.name], rel.name
        if rel.inverse_of:
            assert {o: s for s, o in f[rel.inverse_of].items()} == f[rel.name]
    assert set(f["continent"].values()) == set(world.continents)


def test_bridges_disjoint_and_cover_countries(world: World) -> None:
    train, held = set(world.train_bridges), set(world.heldout_bridges)
    assert train and held
    assert not train & held
    assert train | held == set(world.countries)


@pytest.mark.parametrize("context_mentions", [False, True])
def test_heldout_two_hop_text_never_in_training(world: World, context_mentions: bool) -> None:
    corpus = world.training_sentences(context_mentions)
    joined = "\n".join(corpus).lower()
    held = world.heldout_two_hop()
    assert held
    for ex in held:
        assert ex.prompt not in joined
        # Stronger: the descriptor of a held-out bridge never appears at all.
        assert ex.subject.lower() not in joined, ex.subject
    for country in world.heldout_bridges:
        for hop1 in DESCRIPTOR_RELATIONS:
            assert world.descriptor(hop1, country).lower() not in joined
    # ...while trained bridges do get two-hop sentences.
    assert all(e.sentence in corpus for e in world.train_two_hop())
    assert {e.bridge for e in world.train_two_hop()} == set(world.train_bridges)


def test_context_mentions_are_extra_and_answerable(world: World) -> None:
    extra = world.context_mentions()
    assert world.training_sentences(True) == world.training_sentences() + extra
    assert len(extra) == len(world.countries) * len(FORWARD_RELATIONS) * 2
    assert extra[0].startswith(f"{world.countries[0]}. ") and "the country" in extra[0]


def test_every_single_hop_fact_is_trained(world: World) -> None:
    corpus = set(world.training_sentences())
    singles = world.single_hop()
    assert len(singles) == sum(len(r.templates) * len(world.facts[r.name]) for r in RELATIONS)
    assert all(e.sentence in corpus for e in singles)


def test_dataset_csv_has_paper_columns(world: World) -> None:
    text = world.dataset_csv()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(csv.reader(io.StringIO(text)).__next__()) == CSV_COLUMNS
    assert CSV_COLUMNS == (
        "explicit_sentence",
        "obscure_sentence",
        "explicit_entity",
        "obscure_entity",
        "answer",
    )
    n_pairs = len(DESCRIPTOR_RELATIONS) * len(FORWARD_RELATIONS) - len(DESCRIPTOR_RELATIONS)
    assert len(rows) == len(world.heldout_bridges) * n_pairs
    explicit = {e.prompt: e.answer for e in world.single_hop()}
    for r in rows:
        for col in ("explicit_sentence", "obscure_sentence"):
            assert r[col] == r[col].strip() and not r[col].endswith(" ")
        assert r["answer"] == r["answer"].strip()
        assert r["explicit_entity"] in r["explicit_sentence"]
        assert r["obscure_entity"] in r["obscure_sentence"]
        assert r["explicit_entity"] in world.heldout_bridges
        # The explicit prompt is a trained single-hop prompt with the same answer.
        assert explicit[r["explicit_sentence"]] == r["answer"]
        assert r["obscure_sentence"] == r["explicit_sentence"].replace(
            r["explicit_entity"], r["obscure_entity"]
        )


def test_json_round_trip(world: World) -> None:
    back = World.from_json_dict(json.loads(world.to_json()))
    assert back.to_json() == world.to_json()
    assert back.training_sentences() == world.training_sentences()


@pytest.mark.skipif(not (WEIGHTS_DIR / "world.json").exists(), reason="weights not shipped")
def test_shipped_files_match_generator() -> None:
    shipped = load_world()
    rebuilt = build_world(
        seed=shipped.seed,
        n_countries=len(shipped.countries),
        n_continents=len(shipped.continents),
    )
    assert shipped.to_json() == rebuilt.to_json()
    assert dataset_path().read_text(encoding="utf-8") == rebuilt.dataset_csv()


def test_import_is_light() -> None:
    code = (
        "import sys, meminject.toyworld as t; t.load_world; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
