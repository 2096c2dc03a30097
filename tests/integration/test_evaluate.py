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
from meminject.learn import learn, read_prompt_lines, write_learned
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


def test_generalization_leaves_out_the_edit_prompt(toyworld, edit, tmp_path):
    """Issue 27, defect 2: a positives file that starts with the edit prompt (as the blog's
    do) must not count it as a paraphrase; the output says it was left out."""
    prompt = f"The capital of {edit['country']} is"
    positives = write(tmp_path / "pos.txt", f"{prompt}\nThe capital city of {edit['country']} is\n")
    report = evaluate_edit(
        toyworld,
        [edit["toml"]],
        target=edit["target"],
        prompts={"edit": [prompt], "positive": read_prompt_lines(positives)},
        tokens=0,
    )
    assert report.excluded_positives == [f"{positives}:1"]
    paraphrase = f"The capital city of {edit['country']} is"
    assert [r.prompt for r in report.of("positive")] == [paraphrase]
    assert report.metrics["counts"]["positive"] == 1
    assert report.metrics["positives_excluded_as_edit_prompts"] == 1
    # Whitespace aside, the same text is the same prompt.
    spaced = evaluate_edit(
        toyworld,
        [edit["toml"]],
        target=edit["target"],
        prompts={"edit": [prompt], "positive": ["  " + prompt.replace(" ", "  ")]},
        tokens=0,
    )
    assert spaced.of("positive") == [] and spaced.metrics["generalization"] is None
    args = [
        "evaluate", str(edit["toml"]), "--target", edit["target"], "--prompt", prompt,
        "--positive", str(positives), "--max-new-tokens", "0",
    ]  # fmt: skip
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0, table.output
    assert "generalization: " in table.output and "of 1 positive prompt give" in table.output
    assert f"generalization leaves out 1 positive prompt that is an edit prompt: {positives}:1" in (
        " ".join(table.output.split())
    )


def test_neutral_kl_is_reported_per_memory(toyworld, edit, tmp_path):
    """Issue 27, defect 3: each memory's own neutral KL, so a leaking memory shows even in a
    set with quiet ones. Here an always-on text memory beside the gated edit."""
    always = write(
        tmp_path / "always.toml",
        f'version = 1\n[[memory]]\nname = "always"\ntext = "{edit["target"].strip()}"\n'
        "layer = 1\ntau = 4.0\n",
    )
    neutral = write(tmp_path / "neutral.txt", NEUTRAL[0] + "\n")
    args = [
        "evaluate", str(edit["toml"]), str(always), "--target", edit["target"],
        "--neutral", str(neutral), "--max-new-tokens", "0", "--model", "toyworld", "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    per = json.loads(result.output)["neutral_per_memory"]
    assert set(per) == {"edit", "always"}
    assert per["edit"]["kl_max"] < 1e-6 and per["edit"]["top1_kept"] == 1.0
    alone = evaluate_edit(
        toyworld, [always], target=edit["target"], prompts={"neutral": NEUTRAL[:1]}, tokens=0
    )
    assert per["always"]["kl_mean"] == pytest.approx(alone.rows[0].kl, abs=1e-9)
    assert per["always"]["kl_mean"] > 0.1
    table = CliRunner().invoke(cli, args[:-1])
    assert "neutral, memory always alone: KL mean" in table.output
