"""Edit metrics (issue 15): reliability, generalization, specificity and neutral KL of a
learned toyworld edit, checked against forward passes computed here."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import meminject
from meminject.cli import cli
from meminject.errors import BadInputError
from meminject.evaluate import evaluate_edit
from meminject.learn import learn, write_learned
from tests.conftest import write
from tests.integration.test_learn import capitals, world  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

NEUTRAL = ["The country that uses the greilek is located in", "The leader of Vreduthur is"]


@pytest.fixture(scope="module")
def edit(toyworld, capitals, tmp_path_factory):  # noqa: F811
    """country 0's capital becomes country 1's (the blog's deliberately wrong edit)."""
    (country, right), (_, wrong) = capitals[0], capitals[1]
    learned = learn(toyworld, f"The capital of {country} is", wrong, layer=2, site="resid_pre")
    out = tmp_path_factory.mktemp("edit") / "edit.toml"
    toml, _ = write_learned(out, learned, toyworld, name="edit", boundary=0.3, hardness=3.0)
    return {"country": country, "right": right, "target": " " + wrong, "toml": toml}


def _next_log_probs(model, prompt, memories=None):
    with torch.no_grad(), meminject.inject(model, memories):
        return model.bridge(model.to_tokens(prompt))[0, -1].double().log_softmax(-1)


def test_metrics_match_forward_passes(toyworld, edit, capitals):  # noqa: F811
    prompts = {
        "edit": [f"The capital of {edit['country']} is"],
        "positive": [f"The capital city of {edit['country']} is"],
        "negative": [f"The capital of {capitals[2][0]} is"],
        "neutral": NEUTRAL,
    }
    report = evaluate_edit(toyworld, [edit["toml"]], target=edit["target"], prompts=prompts)
    target = toyworld.tokenize(edit["target"], prepend_bos=False)[0]
    assert report.target_token == toyworld.token_str(target)
    for row in report.rows:
        before = _next_log_probs(toyworld, row.prompt)
        after = _next_log_probs(toyworld, row.prompt, [edit["toml"]])
        assert row.p_target_before == pytest.approx(float(before[target].exp()), abs=1e-9)
        assert row.p_target_after == pytest.approx(float(after[target].exp()), abs=1e-9)
        kl = float((before.exp() * (before - after)).sum())
        assert row.kl == pytest.approx(max(kl, 0.0), abs=1e-9)
        top_after = int(after.argmax())
        expected_ok = {
            "edit": top_after == target,
            "positive": top_after == target,
            "negative": top_after != target,
            "neutral": top_after == int(before.argmax()),
        }[row.kind]
        assert row.ok == expected_ok
    metrics = report.metrics
    assert metrics["reliability"] == 1.0  # the learning prompt itself
    assert metrics["counts"] == {"edit": 1, "positive": 1, "negative": 1, "neutral": 2}
    assert metrics["neutral_kl_max"] == max(r.kl for r in report.of("neutral"))
    neutral = report.of("neutral")
    kept = sum(r.continuation_before == r.continuation_after for r in neutral) / len(neutral)
    assert metrics["neutral_continuations_kept"] == kept
    assert metrics["negative_continuations_kept"] in (0.0, 1.0)  # one negative prompt
    # The edit's continuation starts with the target; the plain model's with the truth.
    (edit_row,) = report.of("edit")
    assert edit_row.continuation_after.startswith(edit["target"])
    assert edit_row.continuation_before.startswith(" " + edit["right"])


def test_an_always_on_memory_moves_neutral_prompts_more(toyworld, edit):
    gated = evaluate_edit(
        toyworld, [edit["toml"]], target=edit["target"], prompts={"neutral": NEUTRAL}, tokens=0
    )
    add = {"name": "always", "text": edit["target"].strip(), "layer": 1, "tau": 4.0}
    always = evaluate_edit(
        toyworld, add, target=edit["target"], prompts={"neutral": NEUTRAL}, tokens=0
    )
    # On a prompt unlike the key the gate stays shut (KL 0) while the always-on memory
    # moves the distribution. (On "The leader of Vreduthur is", built like the key
    # "The capital of … is", the gate opens partly: KL ≈ 0.1 — what --neutral is for.)
    unlike_gated, unlike_always = gated.rows[0], always.rows[0]
    assert unlike_gated.prompt == unlike_always.prompt == NEUTRAL[0]
    assert unlike_gated.kl < 1e-6 and unlike_gated.ok
    assert unlike_always.kl > 0.1
    assert all(r.continuation_after == "" for r in always.rows)  # tokens=0: none generated


def test_bad_requests_are_bad_input(toyworld, edit):
    with pytest.raises(BadInputError, match="unknown prompt kind 'neutrals'"):
        evaluate_edit(toyworld, [edit["toml"]], target=" x", prompts={"neutrals": ["a"]})
    with pytest.raises(BadInputError, match="evaluate needs prompts"):
        evaluate_edit(toyworld, [edit["toml"]], target=" x", prompts={"edit": []})


def test_evaluate_command_json_and_table(toyworld, edit, tmp_path):
    positives = write(
        tmp_path / "pos.txt", f"# a paraphrase\nThe capital city of {edit['country']} is\n"
    )
    neutral = write(tmp_path / "neutral.txt", "\n".join(NEUTRAL) + "\n")
    args = [
        "evaluate", str(edit["toml"]), "--target", edit["target"],
        "--prompt", f"The capital of {edit['country']} is",
        "--positive", str(positives), "--neutral", str(neutral), "--max-new-tokens", "3",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["metrics"]["reliability"] == 1.0
    assert [p["kind"] for p in payload["prompts"]] == ["edit", "positive", "neutral", "neutral"]
    assert payload["prompts"][1]["where"] == f"{positives}:2"
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0, table.output
    assert "reliability: 100% of 1 edit prompt give the target" in table.output
    assert "neutral KL(before ‖ after): mean" in table.output
    missing = CliRunner().invoke(cli, [*args[:4]])
    assert missing.exit_code == 2 and "evaluate needs prompts" in missing.output
