"""Markdown tables of a sweep's records, for docs/reproducing.md.

    python experiments/sweep_report.py RECORDS.parquet --name smollm2_2wiki [--top 5]

Reads the tidy records ``meminject sweep --out`` wrote and writes
``experiments/results/<name>.md`` (the tables) and ``<name>_summary.csv`` (one row per
cell: the statistics of :mod:`meminject.sweep.stats`). Neither holds a prompt or a
memory text, so they can be committed while the datasets stay outside the repository.

With ``--memory PATH --model-name NAME`` it also writes the best cell as a memory file
(the text of the dataset's first row, and the cell's numbers in its header).

The tables follow the sweep's own rules: cells ranked by the median gain, the best cell
only among cells whose median prompt improved and beat its controls, and the paper's
mean-% winner shown beside it for comparison, never crowned.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from meminject.sweep import read_records
from meminject.sweep.familywise import familywise_test
from meminject.sweep.stats import best_cell, held_out_check, ranked, summarize

RESULTS = Path(__file__).resolve().parent / "results"


def _nats(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:+.3f}".replace("-", "−")


def _pct(value: float) -> str:
    if not np.isfinite(value):
        return "–"
    text = f"{value:+,.1f} %" if abs(value) < 100 else f"{value:+,.0f} %"
    return text.replace("-", "−")


def _share(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:.0%}".replace("%", " %")


def _cell(row: Any) -> str:
    head = "" if pd.isna(row["head"]) else f" h{int(row['head'])}"
    return f"ℓ {int(row['layer'])}{head}, τ {row['tau']:g}, {row['encoding']}"


def table(rows: list[tuple[str, Any]], per_head: bool) -> list[str]:
    head = "| cell | mean p | median gain [95 % CI], nats | vs controls | beats ctrl |"
    head += " share |" if per_head else ""
    head += " median % | improved | mean % (paper) | controls' mean % | controls improved |"
    lines = [head, "|" + "---|" + "---:|" * (head.count("|") - 2)]
    for label, row in rows:
        ci = f"[{_nats(row['gain_ci_low'])}, {_nats(row['gain_ci_high'])}]"
        cells = [
            label,
            f"{row['p_after']:.4f}",
            f"{_nats(row['median_gain'])} {ci}",
            _nats(row["median_effect"]),
            _share(row["share_beats_controls"]),
        ]
        if per_head:
            cells.append(_share(row.get("head_share", np.nan)))
        cells += [
            _pct(row["median_pct"]),
            _share(row["share_improved"]),
            _pct(row["mean_pct"]) + (" †" if row["mean_pct_disagrees"] else ""),
            _pct(row["control_mean_pct"]),
            _share(row["control_share_improved"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(records: pd.DataFrame, top: int) -> tuple[str, pd.DataFrame]:
    summary = summarize(records)
    per_head = bool(summary["head"].notna().any())
    order = ranked(summary)
    prompts = records["row_id"].nunique()
    best = best_cell(summary)
    paper = ranked(summary, "mean_pct").iloc[0]
    positive = int((summary["median_gain"] > 0).sum())
    significant = int((summary["gain_ci_low"] > 0).sum())
    lines = [
        f"{prompts} prompts × {len(summary)} cells; p(answer) before injection: mean "
        f"{records.groupby('row_id')['p_before'].first().mean():.4f}.",
        f"Cells with a positive median gain: {positive} of {len(summary)}; with its 95 % "
        f"interval above 0: {significant}.",
        "",
    ]
    rows = [
        (_cell(r) + (" (best)" if best and _same(r, best) else ""), r)
        for _, r in order.head(top).iterrows()
    ]
    if not any(_same(r, paper) for _, r in rows):
        rows.append((_cell(paper) + " (best by the paper's mean %)", paper))
    else:
        rows = [
            (label + (" (best by the paper's mean %)" if _same(r, paper) else ""), r)
            for label, r in rows
        ]
    lines += table(rows, per_head)
    if best is None:
        lines += ["", "No cell helps: in none did the median prompt improve and beat its controls."]
    check = held_out_check(records)
    if check is not None:
        cell = check["cell"]
        if cell is None:
            lines += [
                "",
                f"Held-out check: on half of the prompts ({check['n_selection']}) "
                "no cell helps either.",
            ]
        else:
            low, high = cell["held_out_ci"]
            s_low, s_high = cell["selection_ci"]
            lines += [
                "",
                f"Held-out check: chosen on {check['n_selection']} prompts, {_cell(cell)} has "
                f"median gain {_nats(cell['selection_median_gain'])} [{_nats(s_low)}, "
                f"{_nats(s_high)}] there and {_nats(cell['held_out_median_gain'])} "
                f"[{_nats(low)}, {_nats(high)}] on the other {check['n_held_out']} "
                f"({_share(cell['held_out_share_beats_controls'])} beat their controls): "
                + ("it holds up." if low > 0 else "not confirmed."),
            ]
    if best is not None:
        lines += ["", _baselines(best)]
    test = familywise_test(records)
    if test is not None:
        top_cell = test.cells.iloc[0]
        lines += [
            "",
            f"Family-wise test (sign flips of {test.n_units} {test.units}, max-t over "
            f"{len(test.cells)} cells, the {test.measure} against "
            + ("the controls" if test.measure == "effect" else "no memory")
            + f"): {test.significant} cell{'' if test.significant == 1 else 's'} significant "
            f"at 5 %; the highest t, {_cell(top_cell)}, adjusted p = "
            f"{top_cell['p_adjusted']:.3g}.",
        ]
    lines += by_tau(summary)
    for encoding, part in summary.groupby("encoding", observed=True):
        first = ranked(part).iloc[0]
        lines.append(
            f"\nBest {encoding} cell: {_cell(first)}, median gain "
            f"{_nats(first['median_gain'])} [{_nats(first['gain_ci_low'])}, "
            f"{_nats(first['gain_ci_high'])}], {_share(first['share_beats_controls'])} beat "
            "their controls."
        )
    return "\n".join(lines) + "\n", summary


def by_tau(summary: pd.DataFrame) -> list[str]:
    """Encodings side by side at each τ, each at its best layer (by median gain): with τ
    in residual-norm units, equal-size interventions, so "which encoding helps" is not a
    question of scale. Empty for a sweep of one τ or one encoding."""
    encodings = list(dict.fromkeys(str(e) for e in summary["encoding"]))
    taus = sorted(summary["tau"].unique())
    if len(encodings) < 2 or len(taus) < 2:
        return []
    lines = [
        "",
        "Each encoding at its best layer, by τ (median gain [95 % CI], nats; ℓ the layer):",
        "",
        "| τ | " + " | ".join(encodings) + " |",
        "|---:|" + "---|" * len(encodings),
    ]
    for tau in taus:
        cells = []
        for encoding in encodings:
            part = summary[(summary["tau"] == tau) & (summary["encoding"].astype(str) == encoding)]
            if part.empty:
                cells.append("–")
                continue
            r = ranked(part).iloc[0]
            cells.append(
                f"ℓ {int(r['layer'])}: {_nats(r['median_gain'])} [{_nats(r['gain_ci_low'])}, "
                f"{_nats(r['gain_ci_high'])}]"
            )
        lines.append(f"| {tau:g} | " + " | ".join(cells) + " |")
    return lines


def _baselines(best: Any) -> str:
    """The best cell against prompting, another row's memory, and by accuracy."""
    parts = []
    if np.isfinite(best.get("median_vs_in_context", np.nan)):
        parts.append(
            f"against the memory's text in the prompt (in-context lift "
            f"{_nats(best['in_context_lift'])}), injecting is "
            f"{_nats(best['median_vs_in_context'])} [{_nats(best['vs_in_context_ci_low'])}, "
            f"{_nats(best['vs_in_context_ci_high'])}] nats"
        )
    if np.isfinite(best.get("median_vs_shuffled", np.nan)):
        parts.append(
            f"against another row's memory {_nats(best['median_vs_shuffled'])} "
            f"[{_nats(best['vs_shuffled_ci_low'])}, {_nats(best['vs_shuffled_ci_high'])}]"
        )
    if np.isfinite(best.get("top1_after", np.nan)):
        parts.append(
            f"top-1 accuracy {_share(best['top1_before'])} → {_share(best['top1_after'])}"
            + (
                f" ({_share(best['top1_in_context'])} in-context)"
                if np.isfinite(best.get("top1_in_context", np.nan))
                else ""
            )
        )
    if np.isfinite(best.get("share_explicit_known", np.nan)):
        parts.append(
            f"the model answers {_share(best['share_explicit_known'])} of the explicit "
            f"prompts; median gain there {_nats(best['median_gain_known'])}, elsewhere "
            f"{_nats(best['median_gain_unknown'])}; gap closed {_share(best['median_gap_closed'])}"
        )
    return ("Baselines of the best cell: " + "; ".join(parts) + ".") if parts else ""


def _same(row: Any, other: Any) -> bool:
    heads_equal = (pd.isna(row["head"]) and pd.isna(other["head"])) or row["head"] == other["head"]
    return bool(
        row["layer"] == other["layer"]
        and heads_equal
        and row["tau"] == other["tau"]
        and str(row["encoding"]) == str(other["encoding"])
    )


def memory_file(
    records: pd.DataFrame,
    summary: pd.DataFrame,
    model_name: str,
    source: str,
    name: str = "best-cell",
) -> str | None:
    """The best cell as a memory file (None when no cell helps), its evidence in comments."""
    from meminject.memfile_writer import memory_file_text

    best = best_cell(summary)
    if best is None:
        return None
    first = records[(records["kind"] == "memory")].sort_values("row_id").iloc[0]
    check = held_out_check(records)
    header = [
        f"The best cell of `meminject sweep {source}` on {model_name} by the median gain",
        f"({records['row_id'].nunique()} prompts, {best['control_n'] // max(best['n'], 1)} "
        f"random controls each): median gain {_nats(best['median_gain'])} nats "
        f"[{_nats(best['gain_ci_low'])}, {_nats(best['gain_ci_high'])}]"
        + (" (not significant: the interval includes 0)" if best["gain_ci_low"] <= 0 else "")
        + f", {_share(best['share_beats_controls'])} of prompts beat",
        f"their controls, median change of p(answer) {_pct(best['median_pct'])}.",
    ]
    if check is not None and check["cell"] is not None and _same(check["cell"], best):
        low, high = check["cell"]["held_out_ci"]
        header.append(
            f"Chosen on half of the prompts, this cell was also the best there; on the other "
            f"half its median gain was {_nats(check['cell']['held_out_median_gain'])} "
            f"[{_nats(low)}, {_nats(high)}]."
        )
    elif check is not None:
        header.append("Chosen on half of the prompts, another cell won: treat this one as a lead.")
    per_head = not pd.isna(best["head"])
    header += [
        "The text is the memory of the dataset's first row; the cell (layer, tau, encoding"
        + (", head" if per_head else "")
        + ")",
        "is what the sweep measured, for any prompt's bridge entity.",
    ]
    memory: dict[str, Any] = {
        "name": name,
        "text": str(first["memory"]),
        "encoding": str(best["encoding"]),
        "layer": int(best["layer"]),
    }
    if per_head:
        memory |= {"head": int(best["head"]), "site": "attn_z"}
    memory["tau"] = float(best["tau"])
    if str(first.get("tau_units", "absolute")) == "resid_norm":
        memory |= {"tau_units": "resid_norm", "resid_norm": float(f"{first['resid_norm']:.6g}")}
    return memory_file_text(
        memory, model={"name": model_name}, header=header, schema="../memory.schema.json"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--memory", type=Path, help="write the best cell as this memory file")
    parser.add_argument("--model-name", help="the [model] name of --memory")
    parser.add_argument("--source", default="", help="the sweep's dataset, for --memory")
    parser.add_argument("--plot", type=Path, help="(re)draw the sweep's heatmap here")
    parser.add_argument("--title", default="", help="the heatmap's title")
    args = parser.parse_args()
    records = read_records(args.records)
    text, summary = report(records, args.top)
    if args.plot is not None:
        from meminject.plots import plot_heatmap

        plot_heatmap(summary, args.plot, title=args.title, force=True)
    if args.memory is not None:
        body = memory_file(records, summary, args.model_name, args.source, args.memory.stem)
        if body is None:
            print(f"no memory file written: no cell helps ({args.memory})")
        else:
            from meminject.loading import load_memories

            args.memory.parent.mkdir(parents=True, exist_ok=True)
            args.memory.write_text(body, encoding="utf-8")
            load_memories([args.memory])  # a file meminject reads back
            print(f"memory file: {args.memory}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text, encoding="utf-8")
    summary.to_csv(RESULTS / f"{args.name}_summary.csv", index=False, float_format="%.6g")
    print(text)


if __name__ == "__main__":
    main()
