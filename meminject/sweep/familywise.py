"""Does any cell of a sweep beat chance, once the number of cells is paid for?

A sweep tries dozens of (layer, head, τ, encoding) cells; at 5 %, one cell in twenty
shows an interval above zero by luck, so "the best cell's interval excludes 0" is not
evidence that the memory does anything. This is the single-step max-T test of Westfall
and Young with sign flips: under the null hypothesis that a memory's content does
nothing, each unit's effect (the memory's log p minus its controls') is as likely
negative as positive, so flipping the signs of whole units gives the null distribution.
The same flip applies to every cell at once, which keeps the cells' correlation (they
share prompts), and the maximum over cells of the one-sided t statistic is compared
with each cell's observed t. A cell's adjusted p-value is the share of flips whose
maximum reaches its t: it controls the family-wise error over all cells, with no
assumption about how the cells depend on each other.

Units are prompts, or memories where prompts share them (the per-prompt effects
averaged within a memory), as the bootstrap and the held-out split take them
(:func:`meminject.sweep.stats.memory_clusters`). The statistic is the effect against
the random-token controls; a sweep run without controls tests the lift over no memory,
which also moves when any vector is injected, and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

#: Sign-flip resamples, and their seed: one set of records gives one answer.
FLIPS = 10_000
FLIP_SEED = 0
#: The family-wise level the count of significant cells is reported at.
ALPHA = 0.05
#: Fewest units for the test to run (2^units flips must exceed the resamples' resolution).
MIN_UNITS = 6


@dataclass(frozen=True)
class FamilywiseTest:
    """The test's outcome: per cell (``cells``: the cell columns, ``t`` and ``p_adjusted``,
    best first) and what it was computed on."""

    cells: pd.DataFrame
    measure: str  # "effect" (vs controls) or "lift" (vs no memory)
    units: str  # "prompts" or "memories"
    n_units: int
    flips: int

    @property
    def significant(self) -> int:
        """How many cells beat chance at family-wise level :data:`ALPHA`."""
        return int((self.cells["p_adjusted"] <= ALPHA).sum())

    def to_json(self) -> dict[str, Any]:
        best = self.cells.iloc[0]
        return {
            "measure": self.measure,
            "units": self.units,
            "n_units": self.n_units,
            "flips": self.flips,
            "alpha": ALPHA,
            "cells": len(self.cells),
            "significant_cells": self.significant,
            "best": {
                **{key: _plain(best[key]) for key in self.cells.columns if key != "t"},
                "t": float(best["t"]),
            },
        }


def _plain(value: Any) -> Any:
    import pandas as pd

    if value is pd.NA or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value


def familywise_test(
    records: pd.DataFrame, *, flips: int = FLIPS, seed: int = FLIP_SEED
) -> FamilywiseTest | None:
    """The max-T sign-flip test over the records' cells (see the module docstring). None
    when fewer than :data:`MIN_UNITS` units have a value in every cell."""
    import numpy as np

    from meminject.sweep.stats import CELL_COLUMNS, memory_clusters, paired

    per_prompt = paired(records)
    if per_prompt.empty:
        return None
    measure = "lift" if per_prompt["effect"].isna().all() else "effect"
    by_memory = memory_clusters(records)
    per_prompt = per_prompt.assign(head=per_prompt["head"].astype("Int64").fillna(-1))
    if by_memory is None:
        per_prompt["unit"] = per_prompt["row_id"]
        units = "prompts"
    else:
        per_prompt["unit"] = per_prompt["row_id"].map(by_memory)
        units = "memories"
    table = per_prompt.pivot_table(
        index=CELL_COLUMNS, columns="unit", values=measure, aggfunc="mean", observed=True
    )
    table = table.loc[:, np.isfinite(table.to_numpy(np.float64)).all(axis=0)]
    if table.shape[1] < MIN_UNITS:
        return None
    x = table.to_numpy(np.float64)  # cells × units
    observed = _t(x, np.ones((1, x.shape[1])))[0]
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(flips, x.shape[1]))
    maxima = np.concatenate([_t(x, signs[i : i + 1000]).max(axis=1) for i in range(0, flips, 1000)])
    ordered = np.sort(maxima)
    reaching = flips - np.searchsorted(ordered, observed, side="left")
    p_adjusted = (1 + reaching) / (flips + 1)
    cells = table.index.to_frame(index=False)
    cells["head"] = cells["head"].astype("Int64").replace(-1, np.nan).astype("Int64")
    cells["t"] = observed
    cells["p_adjusted"] = p_adjusted
    cells = cells.sort_values(["t"], ascending=False, kind="stable").reset_index(drop=True)
    return FamilywiseTest(
        cells=cells, measure=measure, units=units, n_units=x.shape[1], flips=flips
    )


def _t(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """One-sided t of each cell's mean unit effect, for each sign pattern: [patterns,
    cells]. Flipping signs leaves each unit's square alone, so only the sums change."""
    import numpy as np

    n = x.shape[1]
    sums = signs @ x.T
    squares = (x * x).sum(axis=1)
    mean = sums / n
    variance = np.maximum((squares[None, :] - n * mean * mean) / (n - 1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / np.sqrt(variance / n)
        # A cell whose every unit has the same effect has no spread: ±inf, or 0 for none.
        t = np.where(variance > 0, t, np.sign(mean) * np.inf)
    out: np.ndarray = np.nan_to_num(t, nan=0.0, posinf=np.inf, neginf=-np.inf)
    return out
