"""``meminject evaluate --counterfact``: a memory bank scored on edits in CounterFact's
schema (issue 27, item 6's reader), with the field's metrics computed here by hand too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import meminject
from meminject.cli import cli
from meminject.evaluate import evaluate_counterfact, read_counterfact

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MEMORY = ROOT / "memories" / "toyworld" / "local" / "vreduthur-capital.toml"

RECORDS = [
    {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "The capital of {} is",
            "subject": "Vreduthur",
            "target_new": {"str": "Shigosmir", "id": "x"},
            "target_true": {"str": "Geindor", "id": "y"},
        },
        "paraphrase_prompts": ["The capital city of Vreduthur is", "Vreduthur's capital is"],
        "neighborhood_prompts": ["The capital of Rechelur is", "The leader of Vreduthur is"],
        "generation_prompts": ["Vreduthur is known for"],
    }
]


def _logp(model, prompt: str, target: str, memories=None) -> float:
    prompt_ids = model.tokenize(prompt)
    target_ids = model.continuation_ids(target)
    ids = torch.tensor([prompt_ids + target_ids[:-1]])
    with torch.no_grad(), meminject.inject(model, memories):
        logp = model.bridge(ids)[0].double().log_softmax(-1)
    return sum(float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(target_ids))


def test_counterfact_metrics_match_forward_passes(toyworld, tmp_path):
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    records = read_counterfact(path)
    assert records[0].rewrite_prompt == "The capital of Vreduthur is"
    result = evaluate_counterfact(toyworld, [MEMORY], records)
    m = result["metrics"]
    assert m["records"] == 1
    # The unedited model answers Geindor; the memory makes Shigosmir more likely.
    assert m["rewrite_before"] == 0.0 and m["rewrite_after"] == 1.0
    assert m["rewrite_acc_after"] == 1.0
    assert m["paraphrase_after"] == 1.0
    for row in result["prompts"]:
        for label, memories in (("before", None), ("after", [MEMORY])):
            expected_new = _logp(toyworld, row["prompt"], "Shigosmir", memories)
            expected_true = _logp(toyworld, row["prompt"], "Geindor", memories)
            assert row[label]["logp_new"] == pytest.approx(expected_new, abs=1e-6)
            assert row[label]["logp_true"] == pytest.approx(expected_true, abs=1e-6)
    neighbours = [r for r in result["prompts"] if r["kind"] == "neighborhood"]
    score = sum(r["after"]["logp_true"] > r["after"]["logp_new"] for r in neighbours) / 2
    kept = sum(r["after"]["top1"] == r["before"]["top1"] for r in neighbours) / 2
    assert m["neighborhood_score_after"] == score
    assert m["locality"] == kept == 1.0


def test_counterfact_command_and_its_errors(toyworld, tmp_path):
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    result = CliRunner().invoke(cli, ["evaluate", str(MEMORY), "--counterfact", str(path)])
    assert result.exit_code == 0, result.output
    assert "efficacy: p(new) > p(true) on the rewrite prompt: 0% → 100%" in result.output
    assert "locality: neighbours' top-1 next token kept: 100%" in result.output
    broken = [{**RECORDS[0], "requested_rewrite": {**RECORDS[0]["requested_rewrite"]}}]
    del broken[0]["requested_rewrite"]["target_true"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken), encoding="utf-8")
    result = CliRunner().invoke(cli, ["evaluate", str(MEMORY), "--counterfact", str(bad)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {bad}: record #1: field 'requested_rewrite.target_true': missing or not a "
        "non-empty string\n"
    )
    mixed = CliRunner().invoke(
        cli, ["evaluate", str(MEMORY), "--counterfact", str(path), "--target", "x"]
    )
    assert mixed.exit_code == 2 and "--counterfact takes its prompts" in mixed.stderr
    none = CliRunner().invoke(cli, ["evaluate", str(MEMORY), "--prompt", "a"])
    assert none.exit_code == 2 and "evaluate needs --target" in none.stderr
