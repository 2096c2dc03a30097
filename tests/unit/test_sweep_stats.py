"""Sweep statistics against values computed by hand (issue 15): paired effects against
controls, the bootstrap interval, the default ranking and the best cell."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from meminject.errors import BadInputError
from meminject.sweep.stats import (
    bootstrap_median_ci,
    check_rank_stat,
    paired,
    ranked,
    summarize,
)


def _records(cells: dict[float, list[tuple[float, float, list[float]]]]) -> pd.DataFrame:
    """Records of one layer and encoding: per τ, rows of (p_before, p_after of the
    memory, p_after of each control)."""
    out = []
    for tau, rows in cells.items():
        for row_id, (before, after, controls) in enumerate(rows):
            variants = [("memory", pd.NA, after)]
            variants += [("control", i, c) for i, c in enumerate(controls)]
            for kind, control, p in variants:
                out.append(
                    {
                        "row_id": row_id,
                        "layer": 3,
                        "head": pd.NA,
                        "tau": tau,
                        "encoding": "unembed",
                        "kind": kind,
                        "control": control,
                        "p_before": before,
                        "p_after": p,
                        "change": p - before,
                        "pct_change": 100 * (p - before) / before,
                        "improved": p > before,
                    }
                )
    frame = pd.DataFrame(out)
    frame["head"] = frame["head"].astype("Int64")
    frame["encoding"] = pd.Categorical(frame["encoding"])
    frame["kind"] = pd.Categorical(frame["kind"], categories=["memory", "control"])
    return frame


# τ = 1: the memory helps every prompt a little, more than its controls.
# τ = 8: one prompt at p = 1e-6 jumps 100-fold, the other two collapse: the paper's mean %
# is huge, the median prompt lost almost everything.
HELPS = [(0.2, 0.3, [0.2, 0.2]), (0.1, 0.15, [0.1, 0.1]), (0.4, 0.5, [0.4, 0.45])]
DEGENERATE = [(1e-6, 1e-4, [1e-5, 1e-5]), (0.2, 0.001, [0.01, 0.01]), (0.4, 0.002, [0.02, 0.02])]


def test_paired_values_by_hand():
    per = paired(_records({1.0: HELPS})).sort_values("row_id")
    lift = [math.log(0.3 / 0.2), math.log(0.15 / 0.1), math.log(0.5 / 0.4)]
    effect = [
        math.log(0.3) - math.log(0.2),
        math.log(0.15) - math.log(0.1),
        math.log(0.5) - (math.log(0.4) + math.log(0.45)) / 2,
    ]
    np.testing.assert_allclose(per["lift"], lift, rtol=1e-12)
    np.testing.assert_allclose(per["effect"], effect, rtol=1e-12)
    np.testing.assert_allclose(per["gain"], np.minimum(lift, effect), rtol=1e-12)


def test_summary_by_hand():
    summary = summarize(_records({1.0: HELPS, 8.0: DEGENERATE}))
    helps = summary[summary["tau"] == 1.0].iloc[0]
    bad = summary[summary["tau"] == 8.0].iloc[0]
    assert helps["median_lift"] == pytest.approx(math.log(0.3 / 0.2))  # lifts .405 .405 .223
    assert helps["share_beats_controls"] == 1.0 and helps["share_improved"] == 1.0
    assert helps["mean_dp"] == pytest.approx((0.1 + 0.05 + 0.1) / 3)
    # The degenerate cell: mean % = (9900 − 99.5 − 99.5)/3, median % = −99.5.
    assert bad["mean_pct"] == pytest.approx((9900 - 99.5 - 99.5) / 3)
    assert bad["median_pct"] == pytest.approx(-99.5)
    assert bool(bad["mean_pct_disagrees"]) and not bool(helps["mean_pct_disagrees"])
    assert bad["median_lift"] == pytest.approx(math.log(0.002 / 0.4))
    # Effects: log(1e-4/1e-5) = +2.30, log(0.001/0.01) = log(0.002/0.02) = −2.30.
    assert bad["median_effect"] == pytest.approx(math.log(0.1))
    # Gains: min(4.61, 2.30), min(−5.30, −2.30), min(−5.30, −2.30).
    assert bad["median_gain"] == pytest.approx(math.log(0.005))
    assert helps["control_n"] == 6 and helps["n"] == 3


def test_the_default_ranking_and_the_best_cell_ignore_the_papers_outlier():
    summary = summarize(_records({1.0: HELPS, 8.0: DEGENERATE}))
    assert ranked(summary, "mean_pct").iloc[0]["tau"] == 8.0  # what the paper's metric crowns
    assert ranked(summary).iloc[0]["tau"] == 1.0
    from meminject.sweep.stats import best_cell

    assert best_cell(summary)["tau"] == 1.0
    # Asked for the paper's ranking, the best cell is still one where the median prompt
    # improved: the degenerate cell is never crowned.
    assert best_cell(summary, "mean_pct")["tau"] == 1.0
    assert best_cell(summarize(_records({8.0: DEGENERATE}))) is None


def test_without_controls_the_gain_is_the_lift():
    no_controls = {1.0: [(b, a, []) for b, a, _ in HELPS]}
    summary = summarize(_records(no_controls))
    cell = summary.iloc[0]
    assert cell["control_n"] == 0 and math.isnan(cell["median_effect"])
    assert cell["median_gain"] == cell["median_lift"]
    assert math.isnan(cell["share_beats_controls"])


def test_bootstrap_interval():
    values = np.array([0.5, 0.1, 0.3, 0.2, 0.4])
    low, high = bootstrap_median_ci(values)
    assert low <= float(np.median(values)) <= high
    assert (low, high) == bootstrap_median_ci(values)  # seeded: one answer per input
    assert bootstrap_median_ci(np.full(20, 0.7)) == pytest.approx((0.7, 0.7))
    # By hand: the same resampling the function draws.
    index = np.random.default_rng(0).integers(0, 5, size=(1000, 5))
    medians = np.median(values[index], axis=1)
    assert (low, high) == pytest.approx(tuple(np.quantile(medians, [0.025, 0.975])))
    rng = np.random.default_rng(1)
    narrow = bootstrap_median_ci(rng.normal(size=400))
    wide = bootstrap_median_ci(rng.normal(size=25))
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert all(math.isnan(v) for v in bootstrap_median_ci(np.array([])))


def test_unknown_statistic_is_bad_input():
    assert check_rank_stat("median_gain") == "median_gain"
    with pytest.raises(BadInputError, match="unknown statistic 'mean'; choose median_gain"):
        check_rank_stat("mean")


def test_held_out_check_exposes_a_lucky_winner():
    """τ 1 helps every prompt by e^0.5; τ 2 helps the selection half (even positions of
    the sorted row ids) by e^1 and hurts the other half by e^-1. The selection half
    crowns τ 2; the held-out half shows its median gain is −1 and τ 1 would have held."""
    from meminject.sweep.stats import held_out_check, split_prompts

    n = 24
    steady = [(0.1, 0.1 * math.e**0.5, [0.1]) for _ in range(n)]
    lucky = [(0.1, 0.1 * math.e ** (1 if i % 2 == 0 else -1), [0.1]) for i in range(n)]
    records = _records({1.0: steady, 2.0: lucky})
    first, second = split_prompts(records)
    assert set(first["row_id"]) == set(range(0, n, 2))
    assert set(second["row_id"]) == set(range(1, n, 2))
    check = held_out_check(records)
    assert check is not None
    assert (check["n_selection"], check["n_held_out"]) == (12, 12)
    cell = check["cell"]
    assert cell["tau"] == 2.0
    assert cell["selection_median_gain"] == pytest.approx(1.0)
    assert cell["held_out_median_gain"] == pytest.approx(-1.0)
    assert cell["held_out_ci"][1] == pytest.approx(-1.0)  # every held-out prompt lost
    assert cell["held_out_share_beats_controls"] == 0.0
    # Without the lucky cell the steady one is chosen and confirmed.
    steady_only = held_out_check(records[records["tau"] == 1.0])
    assert steady_only["cell"]["held_out_median_gain"] == pytest.approx(0.5)
    assert steady_only["cell"]["held_out_ci"][0] == pytest.approx(0.5)


def test_held_out_check_needs_enough_prompts_and_says_when_nothing_helps():
    from meminject.sweep.stats import HOLDOUT_MIN_PROMPTS, held_out_check

    few = [(0.1, 0.2, [0.1]) for _ in range(2 * HOLDOUT_MIN_PROMPTS - 1)]
    assert held_out_check(_records({1.0: few})) is None
    hurts = [(0.1, 0.05, [0.1]) for _ in range(2 * HOLDOUT_MIN_PROMPTS)]
    check = held_out_check(_records({1.0: hurts}))
    assert check is not None and check["cell"] is None


def test_csv_records_keep_memory_texts_and_read_empty_fields_as_missing(tmp_path):
    """A memory text "NA", "null" or "" is what was injected; every other empty field
    (no head, no control, a head share or norm that does not apply) is a missing value."""
    from meminject.sweep import read_records, write_records

    records = _records({1.0: HELPS})
    records["memory"] = ["NA", "null", "", "NA", "null", "", "NA", "null", ""][: len(records)]
    records["head_share"] = np.nan
    records["resid_norm"] = np.nan
    write_records(records, tmp_path / "r.csv")
    again = read_records(tmp_path / "r.csv")
    assert list(again["memory"]) == list(records["memory"])
    assert again["head"].isna().all() and again["head_share"].isna().all()
    assert again["resid_norm"].isna().all()
    assert again["control"].isna().sum() == records["control"].isna().sum()
    np.testing.assert_allclose(summarize(again)["median_gain"], summarize(records)["median_gain"])


def _effects(effects: dict[float, list[float]], memories: list[str] | None = None) -> pd.DataFrame:
    """Records whose per-prompt effect against the one control is given, per τ (the base
    and the control at 0.1; the lift equals the effect); ``memories`` names each row's."""
    records = _records(
        {tau: [(0.1, 0.1 * math.exp(e), [0.1]) for e in row] for tau, row in effects.items()}
    )
    if memories is not None:
        records["memory"] = [memories[r] for r in records["row_id"]]
    return records


def test_prompts_sharing_memories_are_resampled_and_split_by_memory():
    from meminject.sweep.stats import memory_clusters, split_prompts

    n = 24
    shared = [f"memory {i // 4}" for i in range(n)]  # 6 memories, 4 prompts each
    records = _effects({1.0: [0.1 * (i // 4) for i in range(n)]}, shared)
    assert memory_clusters(_effects({1.0: [0.1] * n}, [f"m{i}" for i in range(n)])) is None
    assert memory_clusters(_effects({1.0: [0.1] * n})) is None  # no memory texts
    assert memory_clusters(records) == dict(enumerate(shared))
    first, second = split_prompts(records)
    assert set(first["memory"]) == {"memory 0", "memory 2", "memory 4"}
    assert set(second["memory"]) == {"memory 1", "memory 3", "memory 5"}
    # The cluster bootstrap is np.median of the resampled clusters' values, by hand.
    values = np.array([0.1 * (i // 4) + 0.01 * (i % 4) for i in range(n)])
    clusters = np.array(shared, dtype=object)
    low, high = bootstrap_median_ci(values, clusters=clusters)
    drawn = np.random.default_rng(0).integers(0, 6, size=(1000, 6))
    groups = [values[4 * c : 4 * c + 4] for c in range(6)]
    medians = [np.median(np.concatenate([groups[c] for c in row])) for row in drawn]
    assert (low, high) == pytest.approx(tuple(np.quantile(medians, [0.025, 0.975])))
    # Four prompts per memory are not four times the evidence: the interval is wider
    # than resampling prompts one by one pretends.
    loose_low, loose_high = bootstrap_median_ci(values)
    assert high - low > loose_high - loose_low
    # summarize resamples by memory when the records say prompts share them.
    cell = summarize(_effects({1.0: values.tolist()}, shared)).iloc[0]
    assert (cell["gain_ci_low"], cell["gain_ci_high"]) == pytest.approx((low, high))


def test_familywise_test_finds_the_real_cell_and_not_the_lucky_ones():
    from meminject.sweep.familywise import ALPHA, familywise_test

    rng = np.random.default_rng(5)
    n, cells = 40, 30
    noise = {float(t): rng.normal(0.0, 1.0, n).tolist() for t in range(cells)}
    null = familywise_test(_effects(noise), flips=2000)
    assert null is not None and (null.measure, null.units, null.n_units) == ("effect", "prompts", n)
    # The best of 30 null cells has a nominal t past 2 here, and is not significant.
    assert null.cells["t"].iloc[0] > 2.0
    assert null.significant == 0 and null.cells["p_adjusted"].iloc[0] > ALPHA
    real = dict(noise)
    real[99.0] = rng.normal(0.8, 1.0, n).tolist()
    found = familywise_test(_effects(real), flips=2000)
    assert found.cells["tau"].iloc[0] == 99.0
    assert found.cells["p_adjusted"].iloc[0] <= ALPHA and found.significant == 1
    assert found.to_json()["best"]["tau"] == 99.0
    assert familywise_test(_effects(real), flips=2000).cells.equals(found.cells)  # seeded


def test_familywise_p_values_match_exhaustive_sign_flips():
    """With 8 units all 256 sign patterns can be enumerated: the resampled adjusted p of
    each cell is the exact one within Monte Carlo error."""
    import itertools

    from meminject.sweep.familywise import _t, familywise_test

    rng = np.random.default_rng(2)
    effects = {1.0: rng.normal(0.5, 1, 8).tolist(), 2.0: rng.normal(0.2, 1, 8).tolist()}
    test = familywise_test(_effects(effects), flips=20_000)
    x = np.array([effects[1.0], effects[2.0]])
    patterns = np.array(list(itertools.product([-1.0, 1.0], repeat=8)))
    maxima = _t(x, patterns).max(axis=1)
    for cell in test.cells.itertuples():
        exact = float((maxima >= cell.t - 1e-12).mean())
        assert cell.p_adjusted == pytest.approx(exact, abs=0.01)


def test_familywise_units_are_memories_and_without_controls_the_lift():
    from meminject.sweep.familywise import familywise_test

    shared = [f"memory {i // 3}" for i in range(30)]
    test = familywise_test(_effects({1.0: [0.2] * 30, 2.0: [-0.1] * 30}, shared))
    assert (test.units, test.n_units) == ("memories", 10)
    no_controls = _effects({1.0: [0.2 + 0.01 * i for i in range(12)]})
    no_controls = no_controls[no_controls["kind"] == "memory"]
    assert familywise_test(no_controls).measure == "lift"
    assert familywise_test(_effects({1.0: [0.2] * 5})) is None  # too few units


def test_baselines_in_the_summary_by_hand():
    """Per prompt: log p injected − log p with the memory's text in the prompt, and −
    log p with another row's memory in the same cell; the summary's medians and shares."""
    records = _records({1.0: [(0.1, 0.4, [0.1]), (0.2, 0.2, [0.2]), (0.1, 0.05, [0.1])]})
    records["logp_in_context"] = records["row_id"].map(
        {0: math.log(0.2), 1: math.log(0.4), 2: math.log(0.1)}
    )
    shuffled = records[records["kind"] == "memory"].copy()
    shuffled["kind"] = pd.Categorical(
        ["shuffled"] * 3, categories=["memory", "control", "shuffled"]
    )
    shuffled["p_after"] = [0.1, 0.1, 0.1]
    records["kind"] = records["kind"].cat.add_categories("shuffled")
    records = pd.concat([records, shuffled], ignore_index=True)
    per_prompt = paired(records)
    np.testing.assert_allclose(
        per_prompt["vs_in_context"], np.log([0.4 / 0.2, 0.2 / 0.4, 0.05 / 0.1])
    )
    np.testing.assert_allclose(
        per_prompt["in_context_lift"], np.log([0.2 / 0.1, 0.4 / 0.2, 0.1 / 0.1])
    )
    np.testing.assert_allclose(
        per_prompt["vs_shuffled"], np.log([0.4 / 0.1, 0.2 / 0.1, 0.05 / 0.1])
    )
    cell = summarize(records).iloc[0]
    assert cell["median_vs_in_context"] == pytest.approx(math.log(0.5))
    assert cell["share_beats_in_context"] == pytest.approx(1 / 3)
    assert cell["in_context_lift"] == pytest.approx(math.log(2.0))
    assert cell["median_vs_shuffled"] == pytest.approx(math.log(2.0))
    assert cell["share_beats_shuffled"] == pytest.approx(2 / 3)
    assert cell["vs_shuffled_ci_low"] <= math.log(2.0) <= cell["vs_shuffled_ci_high"]
    # The shuffled rows are not controls: the effect is against the control alone.
    np.testing.assert_allclose(per_prompt["effect"], np.log([0.4 / 0.1, 1.0, 0.5]))
    # Without the baselines the columns are there, empty.
    bare = summarize(_records({1.0: [(0.1, 0.4, [0.1])]})).iloc[0]
    assert math.isnan(bare["median_vs_shuffled"]) and math.isnan(bare["median_vs_in_context"])
