"""Heatmaps: the sweep's layers × τ figure (:func:`plot_heatmap`, ``sweep --plot``) and
the panels it shares with ``inspect --plot`` (matplotlib, lazy)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError
from meminject.sweep.stats import DEFAULT_RANK, RANK_STATS, SHORT_LABELS

if TYPE_CHECKING:
    import pandas as pd


def heatmap_panel(
    ax: Any,
    grid: Any,
    *,
    xticks: Sequence[str],
    yticks: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    cmap: str,
    norm: Any,
    fmt: str,
    annotate_up_to: int,
) -> Any:
    """One layers × something panel, numbers written in the cells while they fit, each
    in black or white, whichever reads on its cell's colour."""
    import numpy as np

    image = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, norm=norm)
    ax.set_xticks(range(len(xticks)), list(xticks), fontsize=9)
    ax.set_yticks(range(len(yticks)), list(yticks), fontsize=9)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.set_title(title, fontsize=11)
    if grid.size <= annotate_up_to:
        for y in range(grid.shape[0]):
            for x in range(grid.shape[1]):
                if np.isfinite(grid[y, x]):
                    colour = text_colour(image.cmap(image.norm(grid[y, x])))
                    ax.text(
                        x,
                        y,
                        fmt.format(grid[y, x]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color=colour,
                    )
    return image


def text_colour(rgba: Sequence[float]) -> str:
    """Black on light cells, white on dark ones (relative luminance, WCAG's weights on
    linearised sRGB; the cut-off where both contrasts are equal)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if luminance > 0.179 else "white"


def png_bytes(fig: Any, dpi: int) -> bytes:
    """Render and close a figure (closing matters: pyplot keeps every open figure)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


#: Statistics a heatmap can show: summary column → colour-bar label.
PLOT_STATS = RANK_STATS


def plot_heatmap(
    summary: pd.DataFrame,
    path: Path | str,
    *,
    stat: str = DEFAULT_RANK,
    title: str = "",
    force: bool = False,
) -> None:
    """Layers × τ heatmaps of a per-cell statistic (default: the median gain, see
    :mod:`meminject.sweep.stats`), one panel per encoding, plus a row for the controls
    when the statistic has a control counterpart (the paper's percentages and shares)
    and controls were run; written atomically as PNG. A head sweep gets one row per
    (layer, head): heads are routed through their own output projection and differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from matplotlib.colors import Normalize, SymLogNorm

    from meminject.atomic import write_bytes_atomic

    if stat not in PLOT_STATS:
        raise BadInputError(f"unknown plot statistic '{stat}'; choose {', '.join(PLOT_STATS)}")
    path = Path(path)
    if path.exists() and not force:
        raise BadInputError(f"{path} exists; pass --force to overwrite it")
    if summary.empty:
        raise BadInputError("nothing to plot: the sweep has no rows")
    encodings = list(dict.fromkeys(summary["encoding"].astype(str)))
    has_controls = bool(summary["control_n"].max() > 0)
    control_stat = f"control_{stat}"
    kinds = [(stat, "memory")]
    if has_controls and control_stat in summary:
        kinds.append((control_stat, "control"))
    taus = sorted(summary["tau"].unique())
    per_head = "head" in summary and bool(summary["head"].notna().any())
    if per_head:
        summary = summary.assign(head=summary["head"].astype("Int64"))
        keys = ["layer", "head"]
        rows = sorted({(int(a), int(b)) for a, b in summary[keys].itertuples(index=False)})
        index: Any = pd.MultiIndex.from_tuples(rows, names=keys)
        yticks, ylabel = [f"{layer}·h{head}" for layer, head in rows], "layer · head"
    else:
        keys = ["layer"]
        index = sorted(summary["layer"].unique())
        yticks, ylabel = [str(layer) for layer in index], "layer"
    grids: dict[tuple[str, str], np.ndarray] = {}
    for column, kind in kinds:
        for encoding in encodings:
            part = summary[summary["encoding"].astype(str) == encoding]
            table = part.groupby([*keys, "tau"])[column].mean().unstack("tau")
            grids[(kind, encoding)] = table.reindex(index=index, columns=taus).to_numpy(float)
    values = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    norm: Normalize
    if stat.startswith("share_"):
        norm, fmt = Normalize(vmin=0.0, vmax=1.0), "{:.0%}"  # white at one half
    elif stat in ("median_gain", "median_effect", "median_lift", "mean_dp"):
        span = float(np.abs(values).max()) if values.size else 1.0
        span = span if span > 0 else 1.0
        norm, fmt = Normalize(vmin=-span, vmax=span), "{:+.2f}"  # white at zero
    else:
        # Percent changes run from -100 to the thousands when a base probability is
        # tiny: a symmetric log scale around 0 keeps losses and gains readable.
        span = max(float(np.abs(values).max()) if values.size else 1.0, 1.0)
        norm, fmt = SymLogNorm(linthresh=10.0, linscale=1.0, vmin=-span, vmax=span), "{:.0f}"
    n_rows, n_cols = len(kinds), len(encodings)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        # Cells wide enough for their numbers, panels of a readable size at any grid.
        figsize=(
            1.6 + max(4.5, 0.62 * len(taus)) * n_cols,
            1.2 + max(3.4, 0.42 * len(yticks)) * n_rows,
        ),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for r, (_, kind) in enumerate(kinds):
        for c, encoding in enumerate(encodings):
            ax = axes[r][c]
            grid = grids[(kind, encoding)]
            image = heatmap_panel(
                ax,
                grid,
                xticks=[f"{t:g}" for t in taus],
                yticks=yticks,
                xlabel="τ",
                ylabel=ylabel,
                title=f"{encoding} · {kind}",
                cmap="RdBu_r",
                norm=norm,
                fmt=fmt,
                annotate_up_to=300,
            )
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=SHORT_LABELS[stat])
    if title:
        import textwrap

        # Wrapped to the figure's width (about 11 characters per inch at this size), so a
        # long dataset name is not cut off at the edges.
        width = max(20, int(fig.get_figwidth() * 9))
        fig.suptitle("\n".join(textwrap.wrap(title, width)), fontsize=12)
    write_bytes_atomic(path, png_bytes(fig, dpi=130), overwrite=force)
