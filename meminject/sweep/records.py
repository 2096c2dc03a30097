"""A sweep's results as tidy records: :class:`SweepResult`, the records frame built from
the per-row log-probabilities, the finished rows of an interrupted run (resume) and
where its partial file lies, and records read and written as CSV or Parquet."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError
from meminject.sweep.stats import DEFAULT_RANK, best_cell, summarize

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from meminject.datasets import PromptRow
    from meminject.sweep.config import SweepConfig

OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq")
#: What a record's injected text is: the row's memory, another row's (the shuffled
#: baseline) or random tokens (a control).
KINDS = ("memory", "control", "shuffled")


@dataclass
class SweepResult:
    """The tidy per-(prompt, cell, memory) records and their per-cell summary."""

    records: pd.DataFrame
    config: SweepConfig
    stats: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def summary(self) -> pd.DataFrame:
        return summarize(self.records)

    def best(self, by: str = DEFAULT_RANK) -> dict[str, Any] | None:
        """The best cell by ``by`` among the cells that help (None when none does)."""
        return best_cell(self.summary, by)


def records_frame(
    rows: Sequence[PromptRow],
    texts: Sequence[Sequence[str]],
    before: np.ndarray,
    after: np.ndarray,
    share: np.ndarray,
    config: SweepConfig,
    per_row: dict[str, np.ndarray] | None = None,
    after_rank: np.ndarray | None = None,
) -> pd.DataFrame:
    """Tidy records from the per-row log-probabilities: ``before`` [R], ``after``
    [R, layers, heads, τ, encodings, variants] (one head slot, None, without heads;
    variants: the memory, the shuffled memory when that baseline runs, the controls),
    the share of each memory a head can write, ``share`` [R, layers, heads, encodings,
    variants] (NaN without heads); ``per_row``: columns of one value per row
    (``rank_before``, and ``logp_``/``rank_`` of each reference prompt run), and
    ``after_rank`` the answer's rank in each injected pass (shaped as ``after``)."""
    import numpy as np
    import pandas as pd

    n_rows, _, n_heads, _, _, n_var = after.shape
    heads = list(config.heads) if config.heads is not None else [None]
    shape = after.shape

    def axis(values: Any, dim: int) -> np.ndarray:
        arr = np.asarray(values)
        view = [1] * len(shape)
        view[dim] = len(arr)
        return np.broadcast_to(arr.reshape(view), shape).ravel()

    with np.errstate(all="ignore"):
        p_before = np.exp(before.astype(np.float64))
        p_after = np.exp(after.astype(np.float64))
        pb = np.broadcast_to(p_before.reshape(n_rows, 1, 1, 1, 1, 1), shape).ravel()
        pa = p_after.ravel()
        lb = np.broadcast_to(
            before.astype(np.float64).reshape(n_rows, 1, 1, 1, 1, 1), shape
        ).ravel()
        la = after.astype(np.float64).ravel()
        change = pa - pb
        pct = 100.0 * change / pb
    memory_text = np.empty((n_rows, n_var), dtype=object)
    for i, row_texts in enumerate(texts):
        memory_text[i, :] = row_texts
    variant = axis(np.arange(n_var), 5)
    head_values = pd.array(heads, dtype="Int64")
    shuffled = int("shuffled" in config.baselines)
    kinds = np.array(["memory", *["shuffled"] * shuffled, *["control"] * (n_var - 1 - shuffled)])
    control_values = pd.array([None] * (1 + shuffled) + list(range(n_var - 1 - shuffled)), "Int64")
    per_row = dict(per_row or {})
    # Every column is there whatever ran (NaN: not run), so records of runs with and
    # without a baseline concatenate.
    for name in ("before", "in_context", "explicit"):
        per_row.setdefault(f"rank_{name}", np.full(n_rows, np.nan))
        if name != "before":
            per_row.setdefault(f"logp_{name}", np.full(n_rows, np.nan))
    row_columns = {
        column: np.broadcast_to(
            values.astype(np.float64).reshape(n_rows, 1, 1, 1, 1, 1), shape
        ).ravel()
        for column, values in sorted(per_row.items())
    }
    ranks = (
        np.full(after.size, np.nan) if after_rank is None else after_rank.astype(np.float64).ravel()
    )
    frame = pd.DataFrame(
        {
            "row_id": axis([r.row_id for r in rows], 0),
            "layer": axis(list(config.layers), 1),
            "head": head_values.take(axis(np.arange(n_heads), 2)),
            "site": "attn_out" if config.heads is None else "attn_z",
            "tau": axis(np.asarray(config.taus, dtype=np.float64), 3),
            "encoding": pd.Categorical(axis(list(config.encodings), 4)),
            "kind": pd.Categorical(kinds[variant], categories=list(KINDS)),
            "control": control_values.take(variant),
            "memory": np.broadcast_to(memory_text.reshape(n_rows, 1, 1, 1, 1, n_var), shape)
            .ravel()
            .astype(str),
            "metric": config.metric,
            "tau_units": config.tau_units,
            "positions": config.positions,
            "control_norm": config.control_norm,
            "resid_norm": axis(
                [dict(config.resid_norms or ()).get(layer, np.nan) for layer in config.layers], 1
            ).astype(np.float64),
            "head_share": np.broadcast_to(share[:, :, :, None], shape).ravel(),
            "p_before": pb,
            "p_after": pa,
            "logp_before": lb,
            "logp_after": la,
            **row_columns,
            "rank_after": ranks,
            "change": change,
            "pct_change": pct,
            "improved": pa > pb,
        }
    )
    return frame


def subset_records(
    rows: Sequence[PromptRow],
    texts: Sequence[Sequence[str]],
    before: np.ndarray,
    after: np.ndarray,
    share: np.ndarray,
    index: list[int],
    config: SweepConfig,
    per_row: dict[str, np.ndarray] | None = None,
    after_rank: np.ndarray | None = None,
) -> pd.DataFrame:
    return records_frame(
        [rows[i] for i in index],
        [texts[i] for i in index],
        before[index],
        after[index],
        share[index],
        config,
        {column: values[index] for column, values in (per_row or {}).items()},
        None if after_rank is None else after_rank[index],
    )


def with_previous(previous: pd.DataFrame | None, records: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    if previous is None or previous.empty:
        return records
    merged = pd.concat([previous, records], ignore_index=True)
    for column in ("encoding", "kind"):
        merged[column] = merged[column].astype("category")
    return merged


def _listed(values: set[Any]) -> str:
    """Numbers in numeric order (τ 2 before 10), anything else by its text."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return str(sorted(values) if numbers else sorted(values, key=str))


def finished_records(done: pd.DataFrame, config: SweepConfig) -> pd.DataFrame:
    """The rows of an earlier run that are complete, after checking it used these settings."""
    expected: dict[str, set[Any]] = {
        "layer": set(config.layers),
        "tau": {float(t) for t in config.taus},
        "encoding": set(config.encodings),
        "metric": {config.metric},
    }
    if "site" in done.columns or config.heads is not None:
        # Records written before heads were routed through W_O had no site column; their
        # head cells were attention-output additions, not these.
        expected["site"] = {"attn_out" if config.heads is None else "attn_z"}
        if "site" not in done.columns:
            done = done.assign(site="attn_out")
    if "tau_units" in done.columns or config.tau_units != "absolute":
        # Records written before τ units existed are absolute.
        expected["tau_units"] = {config.tau_units}
        if "tau_units" not in done.columns:
            done = done.assign(tau_units="absolute")
    if "positions" in done.columns or config.positions != "all":
        # Records written before the position ablations added at every position.
        expected["positions"] = {config.positions}
        if "positions" not in done.columns:
            done = done.assign(positions="all")
    if config.controls and config.tau_units == "absolute":
        # Records written before controls were norm-matched kept their own lengths.
        expected["control_norm"] = {config.control_norm}
        if "control_norm" not in done.columns:
            done = done.assign(control_norm="own")
    for column, values in expected.items():
        found = {v.item() if hasattr(v, "item") else v for v in done[column].unique()}
        if column == "tau":
            found = {float(v) for v in found}
        if done.empty or found != values:
            raise BadInputError(
                f"the partial results were made with other settings ({column}: "
                f"{_listed(found)} instead of {_listed(values)}); pass --force instead of "
                "--resume to discard them and start again"
            )
    ran = set()
    if (done["kind"].astype(str) == "shuffled").any():
        ran.add("shuffled")
    for name, column in (("in-context", "logp_in_context"), ("explicit", "logp_explicit")):
        if column in done.columns and done[column].notna().any():
            ran.add(name)
    if ran != set(config.baselines):
        found_text = ", ".join(sorted(ran)) or "none"
        wanted = ", ".join(sorted(config.baselines)) or "none"
        raise BadInputError(
            f"the partial results were made with other settings (baselines: {found_text} "
            f"instead of {wanted}); pass --baselines {found_text} to resume them, or --force "
            "instead of --resume to start again"
        )
    heads = len(config.heads) if config.heads is not None else 1
    per_row = (
        len(config.layers) * heads * len(config.taus) * len(config.encodings) * config.n_variants
    )
    counts = done.groupby("row_id").size()
    complete = counts[counts == per_row].index
    return done[done["row_id"].isin(complete)].reset_index(drop=True)


def partial_path(out: Path) -> Path:
    """Where a sweep that writes ``out`` keeps the rows it has finished while it runs."""
    return out.with_name(f"{out.stem}.partial{out.suffix}")


@dataclass(frozen=True)
class SweepFiles:
    """Where a sweep's records go, and the resume policy: an interrupted sweep leaves
    its finished rows in :func:`partial_path` beside ``out``, checkpointed as it runs;
    ``resume`` continues from them, ``force`` starts again, and without either a
    partial file is an error (hours of work are never dropped silently). Checked before
    the model loads, so a bad path fails in a second rather than after a load."""

    out: Path | None
    partial: Path | None
    #: The finished records of the interrupted run being resumed, if any.
    done: pd.DataFrame | None
    force: bool = False

    @classmethod
    def plan(cls, out: Path | None, *, resume: bool = False, force: bool = False) -> SweepFiles:
        if out is None:
            if resume:
                raise BadInputError("--resume needs --output (the partial results live beside it)")
            return cls(None, None, None, force)
        check_output_path(out, force)
        partial = partial_path(out)
        if not partial.exists():
            return cls(out, partial, None, force)
        if resume:
            return cls(out, partial, read_records(partial), force)
        if not force:
            raise BadInputError(
                f"{partial} holds an interrupted sweep; pass --resume to continue it or "
                "--force to start again"
            )
        return cls(out, partial, None, force)

    def checkpoint(self, records: pd.DataFrame) -> None:
        """Keep the rows finished so far (called by the sweep as it goes)."""
        if self.partial is not None:
            write_records(records, self.partial, force=True)

    def finish(self, records: pd.DataFrame) -> None:
        """Write the whole run to ``out`` and drop the partial file."""
        if self.out is None or self.partial is None:
            return
        write_records(records, self.out, force=self.force)
        self.partial.unlink(missing_ok=True)


# --------------------------------------------------------------------------- files


def check_output_path(path: Path, force: bool) -> None:
    """Fail before hours of compute, not after: known suffix, and no silent overwrite."""
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise BadInputError(f"{path}: unknown output format; use .csv or .parquet")
    if path.exists() and not force:
        raise BadInputError(f"{path} exists; pass --force to overwrite it")


def write_records(records: pd.DataFrame, path: Path | str, *, force: bool = False) -> None:
    """Write tidy records as CSV or Parquet (by suffix), atomically."""
    from meminject.atomic import write_bytes_atomic

    path = Path(path)
    check_output_path(path, force)
    buffer = io.BytesIO()
    if path.suffix.lower() == ".csv":
        records.to_csv(buffer, index=False)
    else:
        records.to_parquet(buffer, index=False)
    write_bytes_atomic(path, buffer.getvalue(), overwrite=force)


def read_records(path: Path | str) -> pd.DataFrame:
    """Read records written by :func:`write_records` (e.g. to merge shards)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        # A memory text such as "NA", "null" or "" is the text injected, never a missing
        # value; in every other column an empty field is one (no head, no control, no
        # head share, absolute τ, and any column added later).
        columns = pd.read_csv(path, nrows=0).columns
        empty = {c: [""] for c in columns if c != "memory"}
        frame = pd.read_csv(path, keep_default_na=False, na_values=empty)
    else:
        frame = pd.read_parquet(path)
    frame["head"] = frame["head"].astype("Int64")
    frame["control"] = frame["control"].astype("Int64")
    return frame
