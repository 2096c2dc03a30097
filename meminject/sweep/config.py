"""What a sweep sweeps: :class:`SweepConfig`, checked when it is made, and the answer
metrics and τ units it takes (what they mean: :mod:`meminject.sweep`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from meminject.errors import BadInputError

METRICS = ("first-token", "full")
TAU_UNITS = ("absolute", "resid_norm")


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep. ``heads=None`` injects into the whole attention output."""

    layers: tuple[int, ...]
    taus: tuple[float, ...]
    encodings: tuple[str, ...] = ("unembed",)
    heads: tuple[int, ...] | None = None
    controls: int = 0
    batch_size: int = 16
    shard: tuple[int, int] = (0, 1)
    metric: str = "first-token"
    seed: int = 0
    #: "absolute" (τ·v, the paper's) or "resid_norm" (τ·N_ℓ·v/‖v‖, N_ℓ the layer's mean
    #: residual-stream norm over the dataset's prompts).
    tau_units: str = "absolute"
    #: (layer, N_ℓ) pairs; measured by :func:`run_sweep` when not given.
    resid_norms: tuple[tuple[int, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.tau_units not in TAU_UNITS:
            raise BadInputError(f"unknown τ units '{self.tau_units}'; choose {TAU_UNITS}")
        if not self.layers or not self.taus or not self.encodings:
            raise BadInputError("a sweep needs at least one layer, one τ and one encoding")
        if self.heads is not None and not self.heads:
            raise BadInputError("--heads names no head")
        if self.metric not in METRICS:
            raise BadInputError(f"unknown answer metric '{self.metric}'; choose {METRICS}")
        if self.controls < 0:
            raise BadInputError("--controls must be >= 0")
        if self.batch_size < 1:
            raise BadInputError("--batch-size must be >= 1")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise BadInputError(f"shard {index}/{count}: need 0 <= i < n")
        for tau in self.taus:
            if not math.isfinite(tau):
                raise BadInputError(f"τ = {tau} is not a finite number")

    @property
    def n_cells(self) -> int:
        heads = len(self.heads) if self.heads is not None else 1
        return len(self.layers) * len(self.taus) * len(self.encodings) * heads

    @property
    def passes_per_batch(self) -> int:
        """Forward passes (replays or full) a batch of rows costs after its base pass:
        one per cell and memory or control; τ = 0 costs none (it is the base pass)."""
        nonzero = sum(1 for tau in self.taus if tau != 0.0)
        return self.n_cells // len(self.taus) * nonzero * (1 + self.controls)
