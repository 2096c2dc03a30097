"""The multi-edit set in CounterFact's schema (issue 27, item 6): the committed files read
with ``meminject evaluate``'s reader and hold what the benchmark needs; the benchmark
scripts' scoring agrees with ``evaluate_counterfact`` on toyworld."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from meminject.evaluate import evaluate_counterfact, read_counterfact
from tests.experiment_scripts import experiment_script

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "experiments" / "data"
FULL = DATA / "counterfact_meminject.json"
KNOWN = DATA / "counterfact_meminject_known.json"
TOY_SET = ROOT / "memories" / "toyworld" / "local" / "counterfact.json"
TOY_MEMORY = ROOT / "memories" / "toyworld" / "local" / "vreduthur-capital.toml"


@pytest.mark.parametrize("path", [FULL, KNOWN], ids=["full", "known"])
def test_set_reads_with_the_counterfact_reader(path):
    records = read_counterfact(path)
    assert len(records) >= 40
    assert len({r.case_id for r in records}) == len(records)
    raw = json.loads(path.read_text(encoding="utf-8"))
    for item, record in zip(raw, records, strict=True):
        rewrite = item["requested_rewrite"]
        assert set(rewrite) == {"prompt", "subject", "target_new", "target_true"}
        assert rewrite["prompt"].count("{}") == 1
        assert record.target_new != record.target_true
        assert not record.target_new.startswith(" ")  # CounterFact's targets: no space
        assert len(record.paraphrase_prompts) == 2
        assert 1 <= len(record.neighborhood_prompts) <= 5
        assert record.rewrite_prompt not in record.paraphrase_prompts
        assert all(record.subject.lower() in p.lower() for p in record.paraphrase_prompts)
        # Neighbours are other subjects with the same true answer.
        assert not any(record.subject.lower() in p.lower() for p in record.neighborhood_prompts)


def test_known_set_is_a_subset_of_the_full_set():
    full = {json.dumps(item, sort_keys=True) for item in json.loads(FULL.read_text("utf-8"))}
    for item in json.loads(KNOWN.read_text("utf-8")):
        assert json.dumps(item, sort_keys=True) in full


@pytest.mark.integration
def test_benchmark_scoring_matches_the_reader(toyworld):
    multi_edit = experiment_script("multi_edit")
    records = read_counterfact(TOY_SET)
    theirs = evaluate_counterfact(toyworld, [TOY_MEMORY], records)
    from meminject.engine import compile_memories
    from meminject.loading import load_memories

    compiled = compile_memories(toyworld, load_memories([TOY_MEMORY]))
    before = multi_edit.scores_for(toyworld, records, None)
    after = multi_edit.scores_for(toyworld, records, compiled)
    ours = multi_edit.metrics(records, before, after)
    assert set(ours) == set(theirs["metrics"])
    for key, value in theirs["metrics"].items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    # Batched (padded) scores equal evaluate's one-prompt-at-a-time log-probabilities.
    for row in theirs["prompts"]:
        lp_new, lp_true, acc, _top, _ = after[(row["case_id"], row["prompt"])]
        assert lp_new == pytest.approx(row["after"]["logp_new"], abs=1e-4)
        assert lp_true == pytest.approx(row["after"]["logp_true"], abs=1e-4)
        assert acc == row["after"]["new_all_top1"]


@pytest.mark.integration
def test_benchmark_and_known_check_run_on_toyworld(toyworld, tmp_path):
    multi_edit = experiment_script("multi_edit")
    known = experiment_script("counterfact_known")
    records = read_counterfact(TOY_SET)
    rows = known.check(toyworld, records)
    assert rows[0]["known"] == (rows[0]["rewrite_true_above_new"] and rows[0]["neighbours"] > 0)
    args = types.SimpleNamespace(model="toyworld", site=None, layer=None, margin=0.5)
    multi_edit.learn_all(toyworld, records, tmp_path, ["cosine", "projection"], args)
    log = json.loads((tmp_path / "learn.json").read_text(encoding="utf-8"))
    assert "error" not in log["0"], log
    assert log["0"]["cosine"]["margin"] >= 0.5
    result = multi_edit.score_all(toyworld, records, tmp_path, ["cosine", "projection"])
    for gate in ("cosine", "projection"):
        g = result["gates"][gate]
        assert g["check"]["agrees"]
        assert g["sequential"]["rewrite_after"] == 1.0
        assert g["batch_1"] == g["sequential"]
    # Fluency per gate: each edit alone equals evaluate --counterfact's on that memory.
    fluency = multi_edit.fluency_all(toyworld, records, tmp_path, ["cosine"], 8)
    alone = fluency["gates"]["cosine"]["sequential"]
    memory = tmp_path / f"case-{records[0].case_id}-cosine.toml"
    theirs = evaluate_counterfact(toyworld, [memory], records[:1], fluency_tokens=8)["metrics"]
    assert alone["edits"] == len(records) == 1
    assert alone["after"] == pytest.approx(theirs["fluency_after"], abs=1e-12)
    assert alone["before"] == fluency["unedited"] == pytest.approx(theirs["fluency_before"])
    cosines = multi_edit.key_cosines(records, tmp_path)
    assert cosines["same_template"]["pairs"] == 0 and cosines["other_template"]["pairs"] == 0
