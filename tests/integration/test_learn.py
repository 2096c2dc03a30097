"""Learning local memories on toyworld (docs/local-memories.md): targets, boundary search, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from meminject.cli import cli
from meminject.errors import BadInputError
from meminject.generation import generate
from meminject.learn import (
    DEFAULT_MARGIN,
    _Objective,
    gated_top1,
    learn,
    search_boundary,
    write_learned,
)
from meminject.loading import load_memories
from tests.conftest import write

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world() -> dict:
    from meminject import toyworld as package

    return json.loads((Path(package.WEIGHTS_DIR) / "world.json").read_text())


@pytest.fixture(scope="module")
def capitals(world) -> list[tuple[str, str]]:
    return list(world["facts"]["capital"].items())[:8]


@pytest.fixture(scope="module")
def wrong_capital(toyworld, capitals):
    """The blog's Tokyo → Kathmandu edit, in toyworld: country 0's capital becomes
    country 1's capital."""
    (country, right), (_, wrong) = capitals[0], capitals[1]
    prompt = f"The capital of {country} is"
    assert generate(toyworld, prompt, max_new_tokens=1).completion.strip() == right
    learned = learn(toyworld, prompt, wrong, layer=2, site="resid_pre")
    return country, right, wrong, learned


def top1(model, prompt: str) -> str:
    return generate(model, prompt, max_new_tokens=1).completion.strip()


def test_learned_delta_makes_the_wrong_target_top1(toyworld, wrong_capital):
    _country, _right, wrong, learned = wrong_capital
    assert learned.prob_before < 0.01
    assert learned.prob_after > learned.prob_before
    assert learned.key.shape == (toyworld.dims.d_model,)
    # α is the smallest that reaches the margin: 5 % less no longer does.
    smaller = learn(
        toyworld, learned.prompt, wrong, layer=2, site="resid_pre", alpha=learned.alpha * 0.95
    )
    objective = _Objective(toyworld, learned.prompt, learned.target_ids, 2, "resid_pre", -1, False)
    assert objective.is_top1(learned.delta)
    assert objective.margin(learned.delta) >= DEFAULT_MARGIN
    assert objective.margin(smaller.delta) < DEFAULT_MARGIN


def test_boundary_search_separates_paraphrases_from_near_misses(
    toyworld, wrong_capital, capitals, tmp_path
):
    country, _right, wrong, learned = wrong_capital
    positives = [
        f"The capital city of {country} is",
        f"{country}'s capital is",
        f"The government of {country} sits in",
        f"The capital of {country} is",
        f"the capital of {country} is",
        f"The capital of {country} is the city of",
    ]
    negatives = [
        *(f"The capital of {c} is" for c, _ in capitals[2:5]),  # other entities, same template
        f"The leader of {country} is",  # same entity, other relations
        f"The language spoken in {country} is",
        f"{wrong} is the capital of",  # the target entity in another relation
    ]
    choice = search_boundary(toyworld, learned, positives, negatives)
    # Without the memory every negative is right and every positive wrong: 6/12 = 0.5.
    # A gate that fires everywhere flips that: at most 6/12. Requiring 10/12 means the
    # gate really separates paraphrases from near misses, with two mistakes allowed
    # (measured: see the closing note and docs/local-memories.md).
    assert choice.accuracy >= 10 / 12, choice.table
    best = [r for r in choice.table if r.accuracy == choice.accuracy]
    assert best[0].boundary <= choice.boundary <= best[-1].boundary

    toml, _ = write_learned(
        tmp_path / "edit.toml",
        learned,
        toyworld,
        name="edit",
        boundary=choice.boundary,
        hardness=3.0,
        choice=choice,
    )
    memories = load_memories([toml])
    hits = sum(
        generate(toyworld, p, memories, max_new_tokens=1).completion.strip() == wrong
        for p in positives
    )
    misses = sum(
        generate(toyworld, p, memories, max_new_tokens=1).completion.strip() != wrong
        for p in negatives
    )
    # The file applies exactly what the search scores, at the chosen boundary too.
    scored = gated_top1(toyworld, learned, [*positives, *negatives], choice.boundary, 3.0)
    target = learned.target_ids[0]
    assert hits == sum(t == target for t in scored[: len(positives)])
    assert misses == sum(t != target for t in scored[len(positives) :])
    assert hits + misses >= 10


def test_boundary_choice_on_the_model(toyworld, wrong_capital):
    _, _, _, learned = wrong_capital
    choice = search_boundary(toyworld, learned, [learned.prompt], [], grid=[0.1, 0.2, 0.3])
    # Every boundary keeps the learning prompt edited; the plateau's centre is chosen.
    assert [r.accuracy for r in choice.table] == [1.0, 1.0, 1.0]
    assert choice.boundary == pytest.approx(0.2)
    # The projection gate's boundary stays below 1 (at b >= 1 an activation orthogonal
    # to the key opens the gate past 1/e).
    with pytest.raises(
        BadInputError, match=r"boundary of the 'projection' gate must be in \(0, 1\)"
    ):
        search_boundary(toyworld, learned, [learned.prompt], [], grid=[0.5, 1.0])


def test_teacher_forcing_fits_every_target_token(toyworld, world):
    country, _leader = next(iter(world["facts"]["leader"].items()))
    other = list(world["facts"]["leader"].values())[3]
    prompt = f"The leader of {country} is"
    learned = learn(toyworld, prompt, other, layer=1, site="resid_pre", steps=2, teacher_force=True)
    assert len(learned.target_ids) >= 2

    objective = _Objective(toyworld, prompt, learned.target_ids, 1, "resid_pre", -1, True)
    assert objective.is_top1(learned.delta)


def test_written_pair_round_trips_and_refuses_overwrite(toyworld, wrong_capital, tmp_path):
    _, _, wrong, learned = wrong_capital
    out = tmp_path / "mem" / "edit.toml"
    toml, tensors = write_learned(out, learned, toyworld, name="edit", boundary=0.3, hardness=3.0)
    memory = load_memories([toml]).entries[0]
    assert memory.memory.strategy == "gated" and memory.memory.boundary == 0.3
    assert memory.model_info.fingerprint == toyworld.fingerprint()
    assert tensors.parent == toml.parent
    assert generate(toyworld, learned.prompt, toml, max_new_tokens=1).completion.strip() == wrong
    before = toml.read_bytes()
    with pytest.raises(BadInputError, match="exists; pass --force"):
        write_learned(out, learned, toyworld, name="edit", boundary=0.4, hardness=3.0)
    assert toml.read_bytes() == before
    with pytest.raises(BadInputError, match="already has a memory named 'edit'"):
        write_learned(out, learned, toyworld, name="edit", boundary=0.4, hardness=3.0, append=True)
    write_learned(out, learned, toyworld, name="edit-2", boundary=0.4, hardness=3.0, append=True)
    assert [e.name for e in load_memories([toml]).entries] == ["edit", "edit-2"]
    write_learned(out, learned, toyworld, name="again", boundary=0.5, hardness=2.0, force=True)
    assert [e.name for e in load_memories([toml]).entries] == ["again"]
    assert sorted(p.name for p in toml.parent.glob("*.safetensors")) == [
        e.memory.tensors for e in load_memories([toml]).entries
    ]


def test_learn_command_end_to_end(toyworld, capitals, tmp_path):
    (country, _), (_, wrong) = capitals[0], capitals[1]
    positives = write(
        tmp_path / "pos.txt",
        f"# paraphrases\nThe capital city of {country} is\n{country}'s capital is\n",
    )
    negatives = write(
        tmp_path / "neg.txt", f"The capital of {capitals[2][0]} is\nThe leader of {country} is\n"
    )
    out = tmp_path / "cli.toml"
    args = [
        "learn",
        f"The capital of {country} is",
        "--target",
        wrong,
        "--layer",
        "2",
        "--site",
        "resid_pre",
        "--positive",
        str(positives),
        "--negative",
        str(negatives),
        "--grid",
        "0.1-0.5:0.1",
        "--output",
        str(out),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "boundary search (2 positives, 2 negatives)" in result.output
    assert f"wrote {out}" in result.output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2
    assert again.stderr == f"Error: {out} exists; pass --force to overwrite it or --append to add\n"
    validated = CliRunner().invoke(cli, ["validate", str(out), "--model", "toyworld"])
    assert validated.exit_code == 0, validated.output


def test_forced_rewrite_of_the_same_memory_keeps_its_tensors(
    toyworld, wrong_capital, tmp_path, monkeypatch
):
    _, _, wrong, learned = wrong_capital
    monkeypatch.chdir(tmp_path)
    out = Path("same.toml")  # relative on purpose: stale files are compared resolved
    _, first = write_learned(out, learned, toyworld, name="edit", boundary=0.3, hardness=3.0)
    _, second = write_learned(
        out, learned, toyworld, name="edit", boundary=0.3, hardness=3.0, force=True
    )
    assert first == second and second.is_file()
    assert generate(toyworld, learned.prompt, out, max_new_tokens=1).completion.strip() == wrong


def test_learn_lists_the_prompts_the_chosen_boundary_gets_wrong(
    toyworld, capitals, wrong_capital, tmp_path
):
    country, _, wrong, learned = wrong_capital
    pos_texts = [f"The capital city of {country} is", f"{country}'s capital is"]
    neg_texts = [f"The capital of {capitals[2][0]} is", f"The leader of {country} is"]
    positives = write(tmp_path / "pos.txt", "# paraphrases\n" + "\n".join(pos_texts) + "\n")
    negatives = write(tmp_path / "neg.txt", "\n".join(neg_texts) + "\n")
    args = [
        "learn", f"The capital of {country} is", "--target", wrong, "--layer", "2",
        "--site", "resid_pre", "--positive", str(positives), "--negative", str(negatives),
        "--grid", "0.001", "--output", str(tmp_path / "narrow.toml"),
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    # An independent evaluation at that boundary: a gate this narrow fires on nothing
    # but the learning prompt, so paraphrases miss the target.
    target = learned.target_ids[0]
    top = gated_top1(toyworld, learned, [*pos_texts, *neg_texts], 0.001, 3.0)
    failing_pos = [i for i, t in enumerate(top[:2]) if t != target]
    failing_neg = [i for i, t in enumerate(top[2:]) if t == target]
    assert failing_pos, "the narrow gate should miss a paraphrase, or this test shows nothing"
    for i in failing_pos:
        assert f"positive {positives}:{i + 2} does not give the target" in result.output
    for i in failing_neg:
        assert f"negative {negatives}:{i + 1} gives the target" in result.output
    listed = result.output.count(" does not give the target") + result.output.count(
        " gives the target ("
    )
    assert listed == len(failing_pos) + len(failing_neg)
