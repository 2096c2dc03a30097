"""Fluency (issue 27, item 5): greedy continuations before and after an edit, through
generation's own path, scored by ROME's n-gram entropy; in ``evaluate`` and
``evaluate --counterfact``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from meminject.cli import cli
from meminject.evaluate import evaluate_counterfact, evaluate_edit, read_counterfact
from meminject.fluency import measure_fluency, ngram_entropy
from meminject.generation import generate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MEMORY = ROOT / "memories" / "toyworld" / "local" / "vreduthur-capital.toml"
PROMPTS = ["The capital of Vreduthur is", "The leader of Rechelur is"]
RECORD = {
    "requested_rewrite": {
        "prompt": "The capital of {} is",
        "subject": "Vreduthur",
        "target_new": {"str": "Shigosmir"},
        "target_true": {"str": "Geindor"},
    },
    "paraphrase_prompts": ["The capital city of Vreduthur is"],
    "neighborhood_prompts": ["The capital of Rechelur is"],
}


def _loud(tmp_path: Path, tau: float) -> Path:
    """An always-on memory; at a large τ it drowns the stream and the text loops."""
    path = tmp_path / f"loud-{tau:g}.toml"
    path.write_text(
        'version = 1\n[model]\nname = "toyworld"\n[[memory]]\nname = "loud"\n'
        f'text = "Rechelur"\nencoding = "unembed"\nlayer = 1\ntau = {tau}\n',
        encoding="utf-8",
    )
    return path


def test_continuations_are_generates_and_scored(toyworld):
    rows = measure_fluency(toyworld, PROMPTS, [MEMORY], tokens=16)
    for prompt, row in zip(PROMPTS, rows, strict=True):
        plain = generate(toyworld, prompt, max_new_tokens=16, stop_at_eos=False)
        edited = generate(toyworld, prompt, [MEMORY], max_new_tokens=16, stop_at_eos=False)
        assert (row.before, row.after) == (plain.completion, edited.completion)
        assert row.entropy_before == ngram_entropy(plain.completion)
        assert row.entropy_after == ngram_entropy(edited.completion)
    # The gated memory edits its own prompt's answer and leaves the other prompt alone.
    assert rows[0].after.startswith(" Shigosmir") and not rows[0].before.startswith(" Shigosmir")
    assert rows[1].after == rows[1].before


def test_an_overwhelming_memory_loses_fluency(toyworld, tmp_path):
    gentle = measure_fluency(toyworld, PROMPTS, [_loud(tmp_path, 1.0)], tokens=24)
    loud = measure_fluency(toyworld, PROMPTS, [_loud(tmp_path, 16.0)], tokens=24)
    for g, row in zip(gentle, loud, strict=True):
        assert row.entropy_before == g.entropy_before > 3.5  # the same unedited text
        assert row.entropy_after < row.entropy_before - 1.5
        assert g.entropy_after > g.entropy_before - 0.5


def test_counterfact_fluency_uses_generation_prompts_or_the_rewrite_and_paraphrases(
    toyworld, tmp_path
):
    path = tmp_path / "edits.json"
    with_prompts = {**RECORD, "case_id": "g", "generation_prompts": ["Vreduthur is known for"]}
    path.write_text(json.dumps([with_prompts, {**RECORD, "case_id": "r"}]), encoding="utf-8")
    records = read_counterfact(path)
    assert records[0].fluency_prompts == ("Vreduthur is known for",)
    assert records[1].fluency_prompts == (
        "The capital of Vreduthur is",
        "The capital city of Vreduthur is",
    )
    result = evaluate_counterfact(toyworld, [MEMORY], records, fluency_tokens=12)
    assert [r["prompt"] for r in result["fluency"]] == [
        "Vreduthur is known for",
        "The capital of Vreduthur is",
        "The capital city of Vreduthur is",
    ]
    by_record = {}
    for row in result["fluency"]:
        edited = generate(toyworld, row["prompt"], [MEMORY], max_new_tokens=12, stop_at_eos=False)
        assert row["after"] == edited.completion
        by_record.setdefault(row["case_id"], []).append(ngram_entropy(edited.completion))
    per_record = [sum(v) / len(v) for v in by_record.values()]
    assert result["metrics"]["fluency_after"] == pytest.approx(sum(per_record) / 2, abs=1e-12)
    assert "fluency_before" not in evaluate_counterfact(toyworld, [MEMORY], records)["metrics"]


def test_evaluate_reports_fluency_on_both_paths(toyworld, tmp_path):
    report = evaluate_edit(
        toyworld, [MEMORY], target="Shigosmir", prompts={"edit": PROMPTS[:1]}, tokens=2,
        fluency_tokens=10,
    )  # fmt: skip
    assert report.metrics["fluency_after"] == report.fluency[0].entropy_after
    assert len(report.fluency[0].after) > len(report.rows[0].continuation_after)
    runner = CliRunner()
    out = runner.invoke(
        cli,
        ["evaluate", str(MEMORY), "--target", "Shigosmir", "--prompt", PROMPTS[0],
         "--fluency-tokens", "10", "--json"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["metrics"]["fluency_after"] == pytest.approx(report.metrics["fluency_after"])
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([RECORD]), encoding="utf-8")
    out = runner.invoke(
        cli, ["evaluate", str(MEMORY), "--counterfact", str(path), "--fluency-tokens", "8"]
    )
    assert out.exit_code == 0, out.output
    assert "fluency: n-gram entropy of 8 greedy tokens: " in out.output
    bad = runner.invoke(
        cli, ["evaluate", str(MEMORY), "--counterfact", str(path), "--fluency-tokens", "-1"]
    )
    assert bad.exit_code == 2 and "--fluency-tokens" in bad.stderr
