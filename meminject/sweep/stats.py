"""Per-cell statistics of a sweep, built so that the default answer is the honest one.

The paper's metric, the mean percent increase ``100·mean((after − before)/before)``, is
dominated by prompts whose base probability is tiny: one prompt going from 1e-6 to 1e-4
is +9,900 % and outweighs a hundred prompts that lost half their probability. A sweep
ranked by it crowns cells where the memory destroys the answer for most prompts. So it
is reported, labelled as the paper's, but nothing is ranked by it unless asked.

Per prompt (in log-probability, nats, so a prompt at 1e-6 and one at 0.3 weigh alike):

* ``lift`` = log p_after(memory) − log p_before: what the memory does to this prompt;
* ``effect`` = log p_after(memory) − mean over the prompt's controls of log
  p_after(control): what the memory's *content* does, beyond injecting any vector of
  its size at that cell (the controls are random-token memories of the same length);
* ``gain`` = min(lift, effect), or the lift when no control was run: positive only when
  the memory beats both doing nothing and a random memory on this prompt.

Per cell: the medians of the three, a percentile-bootstrap 95 % interval of the median
(prompts resampled, or whole memories where prompts share them, a fixed seed, so one
set of records always gives one summary), the
share of prompts whose effect is positive ("beats the controls"), the mean change of p,
and the paper's mean and median percent and share improved. The default ranking is the
median gain: a cell whose median prompt got worse cannot come first, whatever its mean.
Head sweeps add ``head_share``, the mean of ‖v·P_h‖/‖v‖ over the cell's memories: how
much of the memory the head can write (:mod:`meminject.heads`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

CELL_COLUMNS = ["layer", "head", "tau", "encoding"]

#: Resamples of the bootstrap interval; the seed keeps a summary reproducible.
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

#: Statistics a sweep can be ranked and plotted by, with what each means. The first is
#: the default; every one is "higher is better".
RANK_STATS: dict[str, str] = {
    "median_gain": "median over prompts of min(gain over no memory, gain over controls), nats",
    "median_effect": "median paired effect vs the controls (log p memory − log p control), nats",
    "median_lift": "median change of log p(answer), nats",
    "share_beats_controls": "share of prompts where the memory beats its controls",
    "share_improved": "share of prompts whose p(answer) rose",
    "mean_dp": "mean change of p(answer)",
    "median_pct": "median % change of p(answer)",
    "mean_pct": "mean % increase of p(answer) (the paper's metric)",
    "median_vs_in_context": "median log p with the memory injected − with its text in the prompt",
    "median_vs_shuffled": "median log p with the memory − with another row's memory, nats",
    "top1_after": "share of prompts whose answer is the top next token with the memory",
    "median_gap_closed": "median share of the explicit-vs-obscure log p gap the memory closes",
}
DEFAULT_RANK = "median_gain"
#: Short names of the statistics, for axis and colour-bar labels.
SHORT_LABELS: dict[str, str] = {
    "median_gain": "median gain (nats)",
    "median_effect": "median effect vs controls (nats)",
    "median_lift": "median Δ log p (nats)",
    "share_beats_controls": "share beating controls",
    "share_improved": "share of prompts improved",
    "mean_dp": "mean Δp",
    "median_pct": "median % change",
    "mean_pct": "mean % increase (paper)",
    "median_vs_in_context": "median vs in-context (nats)",
    "median_vs_shuffled": "median vs shuffled (nats)",
    "top1_after": "top-1 accuracy with the memory",
    "median_gap_closed": "median share of the gap closed",
}

SUMMARY_COLUMNS = [
    "n",
    "p_before",
    "p_after",
    "mean_dp",
    "mean_pct",
    "median_pct",
    "share_improved",
    "median_lift",
    "lift_ci_low",
    "lift_ci_high",
    "median_effect",
    "effect_ci_low",
    "effect_ci_high",
    "share_beats_controls",
    "median_gain",
    "gain_ci_low",
    "gain_ci_high",
    "mean_pct_disagrees",
    "control_n",
    "control_p_after",
    "control_mean_dp",
    "control_mean_pct",
    "control_median_pct",
    "control_share_improved",
    "in_context_lift",
    "median_vs_in_context",
    "vs_in_context_ci_low",
    "vs_in_context_ci_high",
    "share_beats_in_context",
    "median_vs_shuffled",
    "vs_shuffled_ci_low",
    "vs_shuffled_ci_high",
    "share_beats_shuffled",
    "top1_before",
    "top1_after",
    "top5_after",
    "median_rank_before",
    "median_rank_after",
    "top1_in_context",
    "top1_explicit",
    "share_explicit_known",
    "median_gain_known",
    "median_gain_unknown",
    "median_gap_closed",
]

# Older records (and the first columns of the summary) call the mean change of p
# "mean_change"; both names are kept in the summary for scripts written against it.
_ALIASES = {"mean_change": "mean_dp", "control_mean_change": "control_mean_dp"}


def bootstrap_median_ci(
    values: np.ndarray,
    *,
    clusters: np.ndarray | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (NaN when empty).

    The resampling indices depend only on the seed and the number of values, so two
    cells with the same prompts are resampled alike (their intervals are comparable).

    ``clusters`` (one label per value): resample whole clusters rather than values. Prompts
    that share a memory are not independent draws (toyworld: 224 prompts, 14 memories);
    resampling them one by one counts each memory's prompts as fresh evidence and gives an
    interval too narrow. Each resample draws as many clusters as there are, with
    replacement, and takes the median of all their values."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    tail = (1.0 - confidence) / 2.0
    if clusters is None:
        index = rng.integers(0, values.size, size=(samples, values.size))
        medians = np.median(values[index], axis=1)
    else:
        medians = _clustered_medians(values, np.asarray(clusters), rng, samples)
    low, high = np.quantile(medians, [tail, 1.0 - tail])
    return float(low), float(high)


def _clustered_medians(
    values: np.ndarray, clusters: np.ndarray, rng: np.random.Generator, samples: int
) -> np.ndarray:
    """The median of each cluster resample, as ``np.median`` of the resample's values
    would give it, without building the resamples: a value drawn ``c`` times weighs
    ``c``, and the median is read off the cumulative weights of the sorted values."""
    import numpy as np

    _, code = np.unique(clusters, return_inverse=True)
    k = int(code.max()) + 1
    drawn = rng.integers(0, k, size=(samples, k))
    counts = np.zeros((samples, k), dtype=np.int64)
    np.add.at(counts, (np.arange(samples)[:, None], drawn), 1)
    order = np.argsort(values, kind="stable")
    weights = counts[:, code[order]]
    cumulative = np.cumsum(weights, axis=1)
    total = cumulative[:, -1]
    # 0-based positions of the two middle values of each resample (equal when odd).
    lower = (total - 1) // 2
    upper = total // 2
    sorted_values = values[order]
    at_lower = sorted_values[(cumulative <= lower[:, None]).sum(axis=1)]
    at_upper = sorted_values[(cumulative <= upper[:, None]).sum(axis=1)]
    medians: np.ndarray = (at_lower + at_upper) / 2.0
    return medians


def memory_clusters(records: pd.DataFrame) -> dict[int, str] | None:
    """The memory each prompt (row id) is injected with, when several prompts share one:
    their effects are then correlated, and resampling and held-out splits go by memory.
    None when every prompt has its own memory (or the records carry no memory texts)."""
    if "memory" not in records:
        return None
    memory = records[records["kind"] == "memory"][["row_id", "memory"]].drop_duplicates("row_id")
    texts = memory["memory"].astype(str)
    if texts.nunique() == len(memory):
        return None
    return dict(zip(memory["row_id"].tolist(), texts.tolist(), strict=True))


def _log(frame: pd.DataFrame, column: str) -> np.ndarray:
    """log p from the records: the stored log-probability when there is one (exact even
    where p underflows), else log of the probability."""
    import numpy as np

    log_column = f"log{column}"
    if log_column in frame:
        return frame[log_column].to_numpy(np.float64)
    with np.errstate(divide="ignore"):
        return np.log(frame[column].to_numpy(np.float64))


def paired(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, prompt): ``lift``, ``effect`` (NaN without controls) and
    ``gain``, besides the paper's per-prompt columns of the memory row."""
    import numpy as np

    memory = records[records["kind"] == "memory"].copy()
    memory["lift"] = _log(memory, "p_after") - _log(memory, "p_before")
    keys = [*CELL_COLUMNS, "row_id"]
    # The baselines: the memory's text in the prompt instead (one log p per row), and
    # another row's memory injected in the same cell.
    if "logp_in_context" in memory:
        memory["vs_in_context"] = _log(memory, "p_after") - memory["logp_in_context"]
        memory["in_context_lift"] = memory["logp_in_context"] - _log(memory, "p_before")
    else:
        memory["vs_in_context"] = memory["in_context_lift"] = np.nan
    # What the model knows: the explicit prompt's log p, and the share of the gap
    # between it and the obscure prompt's that the memory closes (prompts with a gap).
    if "logp_explicit" in memory:
        gap = memory["logp_explicit"] - _log(memory, "p_before")
        memory["gap_closed"] = np.where(gap > 0, memory["lift"] / gap, np.nan)
        memory["known"] = np.where(
            memory["rank_explicit"].isna(), np.nan, memory["rank_explicit"] == 1
        )
    else:
        memory["gap_closed"] = memory["known"] = np.nan
    shuffled = records[records["kind"] == "shuffled"]
    if shuffled.empty:
        memory["vs_shuffled"] = np.nan
    else:
        other = (
            shuffled.assign(head=shuffled["head"].fillna(-1), _logp=_log(shuffled, "p_after"))
            .set_index(keys)["_logp"]
            .rename("_shuffled_logp")
        )
        joined = memory.assign(head=memory["head"].fillna(-1)).join(other, on=keys)
        memory["vs_shuffled"] = _log(memory, "p_after") - joined["_shuffled_logp"].to_numpy(
            np.float64
        )
    controls = records[records["kind"] == "control"]
    if controls.empty:
        memory["effect"] = np.nan
        memory["gain"] = memory["lift"]
        return memory
    control_log = controls.assign(_logp=_log(controls, "p_after"))
    # NA heads (whole-layer cells) must pair with each other: key on a filled copy.
    mean_control = (
        control_log.assign(head=control_log["head"].fillna(-1))
        .groupby(keys, observed=True, sort=False)["_logp"]
        .mean()
        .rename("_control_logp")
    )
    joined = memory.assign(head=memory["head"].fillna(-1)).join(mean_control, on=keys)
    memory["effect"] = _log(memory, "p_after") - joined["_control_logp"].to_numpy(np.float64)
    memory["gain"] = np.where(
        np.isnan(memory["effect"]), memory["lift"], np.minimum(memory["lift"], memory["effect"])
    )
    return memory


def _median(values: np.ndarray) -> float:
    """The median of the values that are numbers; NaN when none is."""
    import numpy as np

    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else float("nan")


def _mean(values: np.ndarray) -> float:
    import numpy as np

    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _ranks(part: pd.DataFrame) -> dict[str, float]:
    """Accuracy beside probability: the share of prompts whose answer is the top next
    token (and in the top 5) with the memory, the top-1 share without it and with the
    reference prompts, and the median rank before and after (NaN where not recorded)."""
    import numpy as np

    def column(name: str) -> np.ndarray:
        if name not in part:
            return np.full(len(part), np.nan)
        return part[name].to_numpy(np.float64)

    before, after = column("rank_before"), column("rank_after")
    out = {
        "top1_before": _mean(np.where(np.isnan(before), np.nan, before <= 1)),
        "top1_after": _mean(np.where(np.isnan(after), np.nan, after <= 1)),
        "top5_after": _mean(np.where(np.isnan(after), np.nan, after <= 5)),
        "median_rank_before": _median(before),
        "median_rank_after": _median(after),
    }
    for name in ("in_context", "explicit"):
        ranks = column(f"rank_{name}")
        out[f"top1_{name}"] = _mean(np.where(np.isnan(ranks), np.nan, ranks <= 1))
    return out


def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """Per-cell statistics of tidy records (one sweep's, or several shards' concatenated);
    see the module docstring for what each column means."""
    import numpy as np
    import pandas as pd

    if records.empty:
        return pd.DataFrame(columns=CELL_COLUMNS + SUMMARY_COLUMNS + list(_ALIASES))
    by_memory = memory_clusters(records)
    with np.errstate(all="ignore"):
        per_prompt = paired(records)
        grouped = per_prompt.groupby(CELL_COLUMNS, dropna=False, sort=True, observed=True)
        rows: list[dict[str, Any]] = []
        for cell, part in grouped:
            lift = part["lift"].to_numpy(np.float64)
            effect = part["effect"].to_numpy(np.float64)
            gain = part["gain"].to_numpy(np.float64)
            has_effect = not np.isnan(effect).all()
            row: dict[str, Any] = dict(zip(CELL_COLUMNS, cell, strict=True))
            mean_pct = float(part["pct_change"].mean())
            median_pct = float(part["pct_change"].median())
            row.update(
                n=len(part),
                p_before=float(part["p_before"].mean()),
                p_after=float(part["p_after"].mean()),
                mean_dp=float(part["change"].mean()),
                mean_pct=mean_pct,
                median_pct=median_pct,
                share_improved=float(part["improved"].mean()),
                median_lift=float(np.median(lift)),
                median_effect=float(np.median(effect)) if has_effect else np.nan,
                share_beats_controls=float((effect > 0).mean()) if has_effect else np.nan,
                median_gain=float(np.median(gain)),
                mean_pct_disagrees=bool(np.sign(mean_pct) * np.sign(median_pct) < 0),
            )
            if "head_share" in part:
                # How much of the memory the head can write (‖v·P_h‖/‖v‖; NaN without heads).
                row["head_share"] = float(part["head_share"].mean())
            clusters = (
                None
                if by_memory is None
                else np.array([by_memory[r] for r in part["row_id"].tolist()], dtype=object)
            )
            row["lift_ci_low"], row["lift_ci_high"] = bootstrap_median_ci(lift, clusters=clusters)
            row["gain_ci_low"], row["gain_ci_high"] = bootstrap_median_ci(gain, clusters=clusters)
            if has_effect:
                row["effect_ci_low"], row["effect_ci_high"] = bootstrap_median_ci(
                    effect, clusters=clusters
                )
            else:
                row["effect_ci_low"] = row["effect_ci_high"] = np.nan
            for baseline in ("in_context", "shuffled"):
                versus = part[f"vs_{baseline}"].to_numpy(np.float64)
                if np.isnan(versus).all():
                    row[f"median_vs_{baseline}"] = row[f"share_beats_{baseline}"] = np.nan
                    row[f"vs_{baseline}_ci_low"] = row[f"vs_{baseline}_ci_high"] = np.nan
                    continue
                row[f"median_vs_{baseline}"] = float(np.median(versus))
                row[f"share_beats_{baseline}"] = float((versus > 0).mean())
                row[f"vs_{baseline}_ci_low"], row[f"vs_{baseline}_ci_high"] = bootstrap_median_ci(
                    versus, clusters=clusters
                )
            prompting = part["in_context_lift"].to_numpy(np.float64)
            row["in_context_lift"] = _median(prompting)
            row.update(_ranks(part))
            known = part["known"].to_numpy(np.float64)
            row["share_explicit_known"] = _mean(known)
            row["median_gain_known"] = _median(gain[known == 1])
            row["median_gain_unknown"] = _median(gain[known == 0])
            row["median_gap_closed"] = _median(part["gap_closed"].to_numpy(np.float64))
            rows.append(row)
        summary = pd.DataFrame(rows)
        controls = records[records["kind"] == "control"]
        if controls.empty:
            for column in SUMMARY_COLUMNS[
                SUMMARY_COLUMNS.index("control_n") : SUMMARY_COLUMNS.index("in_context_lift")
            ]:
                summary[column] = np.nan
        else:
            control = (
                controls.assign(head=controls["head"].fillna(-1))
                .groupby(CELL_COLUMNS, sort=False, observed=True)
                .agg(
                    control_n=("p_after", "size"),
                    control_p_after=("p_after", "mean"),
                    control_mean_dp=("change", "mean"),
                    control_mean_pct=("pct_change", "mean"),
                    control_median_pct=("pct_change", "median"),
                    control_share_improved=("improved", "mean"),
                )
            )
            summary = summary.assign(head=summary["head"].astype("Int64").fillna(-1)).join(
                control, on=CELL_COLUMNS
            )
    summary["head"] = summary["head"].astype("Int64").replace(-1, pd.NA)
    summary["control_n"] = summary["control_n"].fillna(0).astype("int64")
    for old, new in _ALIASES.items():
        summary[old] = summary[new]
    summary = summary.sort_values(CELL_COLUMNS).reset_index(drop=True)
    extra = ["head_share"] if "head_share" in summary else []
    return summary[CELL_COLUMNS + SUMMARY_COLUMNS + list(_ALIASES) + extra]


def check_rank_stat(stat: str) -> str:
    from meminject.errors import BadInputError

    if stat not in RANK_STATS:
        raise BadInputError(f"unknown statistic '{stat}'; choose {', '.join(RANK_STATS)}")
    return stat


def ranked(summary: pd.DataFrame, by: str = DEFAULT_RANK) -> pd.DataFrame:
    """Cells best first by ``by`` (NaN last); ties broken by the median gain."""
    check_rank_stat(by)
    keys = [by] if by == DEFAULT_RANK else [by, DEFAULT_RANK]
    return summary.sort_values(keys, ascending=False, na_position="last", kind="stable")


def best_cell(summary: pd.DataFrame, by: str = DEFAULT_RANK) -> dict[str, Any] | None:
    """The best cell by ``by`` among the cells that help: a median prompt whose log p
    rose (``median_lift > 0``) and, with controls, beat its controls (``median_effect >
    0``). None when no cell helps — the honest answer, which callers must say."""
    import numpy as np

    helps = summary["median_lift"].astype(float) > 0
    if summary["control_n"].max() > 0:
        helps &= summary["median_effect"].astype(float) > 0
    candidates = summary[helps & np.isfinite(summary[by].astype(float))]
    if candidates.empty:
        return None
    best: dict[str, Any] = ranked(candidates, by).iloc[0].to_dict()
    return best


#: Fewest prompts per half for the held-out check to mean anything.
HOLDOUT_MIN_PROMPTS = 10


def split_prompts(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two halves of the records by prompt: alternate row ids in sorted order (the same
    split for every cell, and for every run over the same dataset). Where prompts share
    memories (:func:`memory_clusters`) the halves alternate memories, in the order of
    their first row id, so no memory is in both: a memory seen while choosing would
    otherwise vouch for itself on the held-out half."""
    ids = sorted(records["row_id"].unique().tolist())
    by_memory = memory_clusters(records)
    if by_memory is None:
        selection = set(ids[0::2])
    else:
        first_seen = list(dict.fromkeys(by_memory[i] for i in ids))
        chosen = set(first_seen[0::2])
        selection = {i for i in ids if by_memory[i] in chosen}
    in_selection = records["row_id"].isin(selection)
    return records[in_selection], records[~in_selection]


def held_out_check(records: pd.DataFrame, by: str = DEFAULT_RANK) -> dict[str, Any] | None:
    """The winner's curse, measured: pick the best cell (as :func:`best_cell` does) on one
    half of the prompts and report its statistics on the other half.

    With dozens of cells, the best of them on one set of prompts is partly luck: at 95 %,
    one cell in twenty has an interval above 0 by chance. The held-out half did not take
    part in the choice, so its median gain and interval are an honest estimate of the
    chosen cell. Returns None when a half has fewer than ``HOLDOUT_MIN_PROMPTS`` prompts;
    otherwise ``{"n_selection", "n_held_out", "cell"}`` where ``cell`` is None when no cell
    helps on the selection half, else the chosen cell's keys with ``selection_*`` and
    ``held_out_*`` median gains and intervals (and the held-out ``share_beats_controls``).
    """
    import pandas as pd

    first, second = split_prompts(records)
    n_first, n_second = first["row_id"].nunique(), second["row_id"].nunique()
    if min(n_first, n_second) < HOLDOUT_MIN_PROMPTS:
        return None
    result: dict[str, Any] = {
        "n_selection": n_first,
        "n_held_out": n_second,
        "by_memory": memory_clusters(records) is not None,
        "cell": None,
    }
    chosen = best_cell(summarize(first), by)
    if chosen is None:
        return result
    head = chosen["head"]
    mask = (
        (second["layer"] == chosen["layer"])
        & (second["tau"] == chosen["tau"])
        & (second["encoding"].astype(str) == str(chosen["encoding"]))
    )
    mask &= second["head"].isna() if pd.isna(head) else second["head"] == head
    confirm = summarize(second[mask]).iloc[0]
    cell = {key: chosen[key] for key in CELL_COLUMNS}
    cell.update(
        selection_median_gain=chosen["median_gain"],
        selection_ci=(chosen["gain_ci_low"], chosen["gain_ci_high"]),
        held_out_median_gain=float(confirm["median_gain"]),
        held_out_ci=(float(confirm["gain_ci_low"]), float(confirm["gain_ci_high"])),
        held_out_share_beats_controls=float(confirm["share_beats_controls"]),
    )
    result["cell"] = cell
    return result
