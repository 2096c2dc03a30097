"""experiments/sweep_report.py, the tables docs/reproducing.md is written from: its
encoding × τ table holds each encoding's best layer at each τ, from the sweep's own
statistics, on a real toyworld sweep."""

from __future__ import annotations

import pytest

from meminject.datasets import resolve_dataset
from meminject.sweep import SweepConfig, run_sweep
from meminject.sweep.stats import ranked, summarize
from tests.experiment_scripts import experiment_script

pytestmark = pytest.mark.integration


def test_encoding_by_tau_table_names_each_best_layer(toyworld):
    report = experiment_script("sweep_report")
    rows = resolve_dataset("toyworld", limit=32)
    config = SweepConfig(
        layers=(0, 2), taus=(0.1, 0.5), encodings=("unembed", "embed"), controls=1,
        tau_units="resid_norm",
    )  # fmt: skip
    records = run_sweep(toyworld, rows, config).records
    text, summary = report.report(records, top=3)
    assert summary.equals(summarize(records))
    table = text.split("Each encoding at its best layer, by τ")[1].split("\n\n")[1]
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "τ" and sorted(header[1:]) == ["embed", "unembed"]
    for line, tau in zip(lines[2:], (0.1, 0.5), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"{tau:g}"
        for cell, encoding in zip(cells[1:], header[1:], strict=True):
            part = summary[(summary["tau"] == tau) & (summary["encoding"] == encoding)]
            best = ranked(part).iloc[0]
            assert cell.startswith(f"ℓ {int(best['layer'])}: ")
            assert report._nats(best["median_gain"]) in cell
    assert len(lines) == 4
    one_tau = records[records["tau"] == 0.1]
    assert "Each encoding at its best layer" not in report.report(one_tau, top=3)[0]


def test_positions_table_sets_the_modes_side_by_side(toyworld):
    positions = experiment_script("positions_report")
    rows = resolve_dataset("toyworld", limit=32)
    common = dict(layers=(0, 1), taus=(0.1, 0.3), encodings=("embed",), controls=1)
    runs = {
        mode: run_sweep(toyworld, rows, SweepConfig(**common, positions=mode)).records
        for mode in ("all", "last")
    }
    summary = positions.ablation_table(runs, layer=1, encoding="embed")
    assert sorted(zip(summary["positions"], summary["tau"], strict=True)) == [
        ("all", 0.1), ("all", 0.3), ("last", 0.1), ("last", 0.3)
    ]  # fmt: skip
    for mode, records in runs.items():
        alone = summarize(records[records["layer"] == 1])
        mine = summary[summary["positions"] == mode].drop(columns="positions")
        assert mine.reset_index(drop=True).equals(alone.reset_index(drop=True))
    text = positions.render(summary, "t")
    gain = positions._nats(summary.iloc[0]["median_gain"])
    assert f"| 0.1 | all | {gain} [" in text
    # The modes differ, or the table compares nothing.
    assert runs["all"]["logp_after"].ne(runs["last"]["logp_after"]).any()
    with pytest.raises(SystemExit, match="were run with"):
        positions.ablation_table({"last": runs["all"]}, layer=1, encoding="embed")
