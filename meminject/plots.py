"""Heatmap panels shared by ``sweep --plot`` and ``inspect --plot`` (matplotlib, lazy)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


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
    """One layers × something panel, numbers written in the cells while they fit."""
    import numpy as np

    image = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, norm=norm)
    ax.set_xticks(range(len(xticks)), list(xticks), fontsize=7)
    ax.set_yticks(range(len(yticks)), list(yticks), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if grid.size <= annotate_up_to:
        for y in range(grid.shape[0]):
            for x in range(grid.shape[1]):
                if np.isfinite(grid[y, x]):
                    ax.text(x, y, fmt.format(grid[y, x]), ha="center", va="center", fontsize=6)
    return image


def png_bytes(fig: Any, dpi: int) -> bytes:
    """Render and close a figure (closing matters: pyplot keeps every open figure)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
