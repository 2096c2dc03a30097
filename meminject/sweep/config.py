"""What a sweep sweeps: :class:`SweepConfig`, checked when it is made, and the answer
metrics and τ units it takes (what they mean: :mod:`meminject.sweep`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from meminject.errors import BadInputError

METRICS = ("first-token", "full")
TAU_UNITS = ("absolute", "resid_norm")
#: What a memory is compared with besides no memory and the random controls:
#: "in-context" puts the memory's text before the prompt (no injection: what prompting
#: alone does), "shuffled" injects another row's memory in the same cell (what any real
#: memory of this dataset does, at the same encoding and scale), "explicit" scores the
#: row's explicit one-hop prompt (does the model know the fact at all; the gap an
#: injection can close).
BASELINES = ("in-context", "shuffled", "explicit")
#: Where a cell adds its vector: every position (the paper's), the prompt's last token
#: only, or every position but the first (the BOS token, or the first token where the
#: model prepends none: the attention sink either way).
POSITIONS = ("all", "last", "not-bos")
#: How long a random-token control's vector is: "memory" rescales it to the length of
#: the row's memory vector in the same cell (the control then differs from the memory in
#: direction only), "own" keeps its own encoding's length (the paper's controls, matched
#: by token count). In residual-norm units every vector has length τ·N_ℓ, so both agree.
CONTROL_NORMS = ("memory", "own")


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
    #: Where the vector is added (:data:`POSITIONS`): the mechanism ablations.
    positions: str = "all"
    #: The baselines run (:data:`BASELINES`); all by default.
    baselines: tuple[str, ...] = BASELINES
    #: (row_id, memory) pairs: the memory each row's shuffled baseline injects, drawn over
    #: the whole dataset by :func:`meminject.sweep.rows.with_shuffled` when not given.
    shuffled: tuple[tuple[int, str], ...] | None = None
    #: How long a control's vector is (:data:`CONTROL_NORMS`).
    control_norm: str = "memory"

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
        if self.positions not in POSITIONS:
            raise BadInputError(
                f"unknown positions '{self.positions}'; choose {', '.join(POSITIONS)}"
            )
        if self.control_norm not in CONTROL_NORMS:
            raise BadInputError(
                f"unknown control norm '{self.control_norm}'; choose {', '.join(CONTROL_NORMS)}"
            )
        for baseline in self.baselines:
            if baseline not in BASELINES:
                raise BadInputError(
                    f"unknown baseline '{baseline}'; choose {', '.join(BASELINES)} or none"
                )

    @property
    def first_control(self) -> int:
        """The variant index of the first control (after the memory and the shuffled one)."""
        return 1 + int("shuffled" in self.baselines)

    @property
    def n_variants(self) -> int:
        """Memories injected per row and cell: the row's own, the shuffled one, controls."""
        return 1 + int("shuffled" in self.baselines) + self.controls

    @property
    def n_cells(self) -> int:
        heads = len(self.heads) if self.heads is not None else 1
        return len(self.layers) * len(self.taus) * len(self.encodings) * heads

    @property
    def passes_per_batch(self) -> int:
        """Forward passes (replays or full) a batch of rows costs after its base pass:
        one per cell and injected memory (:attr:`n_variants`), τ = 0 none (it is the base
        pass), and one for each of the in-context and explicit baselines."""
        nonzero = sum(1 for tau in self.taus if tau != 0.0)
        references = int("in-context" in self.baselines) + int("explicit" in self.baselines)
        return self.n_cells // len(self.taus) * nonzero * self.n_variants + references
