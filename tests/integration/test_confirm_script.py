"""experiments/confirm.py, which runs a committed confirmation plan on the rows its
exploratory sweep did not see: on toyworld, a plan with a residual-norm cell runs on the
unseen rows only, writes anonymized records and reports its own plan's rule."""

from __future__ import annotations

import csv

import pytest

from meminject.datasets import resolve_dataset
from meminject.sweep import read_records
from tests.experiment_scripts import experiment_script

pytestmark = pytest.mark.integration


def test_a_plan_runs_on_the_unseen_rows_and_reports(tmp_path, monkeypatch):
    confirm = experiment_script("confirm")
    monkeypatch.setattr(confirm, "RESULTS", tmp_path)
    rows = resolve_dataset("toyworld", limit=24)
    with (tmp_path / "toy.csv").open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["obscure_sentence", "explicit_entity", "answer"])
        out.writerows([r.prompt, r.memory, r.answer] for r in rows)
    plan = {
        "title": "t",
        "note": "a second rule",
        "dataset": "toy.csv",
        "controls": 1,
        "control_norm": "memory",
        "metric": "first-token",
        "cell": [
            {
                "name": "toy_cell", "model": "toyworld", "explored_shard": [0, 4],
                "layer": 1, "tau": 0.3, "tau_units": "resid_norm", "encoding": "embed",
            }
        ],
    }  # fmt: skip
    path = confirm.run_cell(plan["cell"][0], plan, tmp_path, "first-token")
    records = read_records(path)
    assert sorted(records["row_id"].unique()) == [i for i in range(24) if i % 4 != 0]
    assert set(records["tau_units"]) == {"resid_norm"}
    assert set(records["control_norm"]) == {"memory"}
    texts = {r.memory for r in rows} | {r.prompt for r in rows}
    assert not set(records["memory"].astype(str)) & texts  # ids, no dataset text
    assert set(records["memory"].astype(str)) <= {f"m{i}" for i in range(200)}
    text = confirm.report(plan, "toy_plan.toml")
    assert "--plan experiments/toy_plan.toml --report-only" in text
    assert "after multiplying by the 1 primary cell)." in text and "a second rule" in text
    lines = text.splitlines()
    line = next(x for x in lines if x.startswith("| toy_cell |"))
    assert "| first-token | 18 |" in line and "not run" not in line
    assert not any("| full |" in x for x in lines)  # no secondary metric planned
