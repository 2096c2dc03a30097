"""The sweep itself: :func:`run_sweep` over a shard's rows, batch by batch and cell by
cell (what it computes, and why the fast path is exact: :mod:`meminject.sweep`)."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError
from meminject.heads import through_head
from meminject.sweep.encoding import LAYER_FREE, encode_batch, encoding_parts, parsed_label
from meminject.sweep.records import (
    SweepResult,
    finished_records,
    records_frame,
    subset_records,
    with_previous,
)
from meminject.sweep.replay import (
    REPLAY_TOLERANCE,
    Adder,
    Batch,
    controls_at_memory_length,
    head_shares,
    injection_hook,
    position_mask,
    residual_norms,
    to_norm,
)
from meminject.sweep.rows import (
    TokenizedRow,
    batch_indices,
    control_texts,
    in_context_prompt,
    shard_rows,
    tokenize_row,
    with_shuffled,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from torch import Tensor

    from meminject.datasets import PromptRow
    from meminject.model_handle import LoadedModel
    from meminject.plugins import Registry
    from meminject.sweep.config import SweepConfig


def progress_bar(enabled: bool, label: str = "sweep", *extra: Any) -> Any:
    """The sweep's progress bar on stderr: forward passes done of all, time left; the
    executors share it (``extra``: more rich columns, such as tasks done)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("passes"),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def check_sweep(model: LoadedModel, config: SweepConfig, registry: Registry) -> list[str]:
    """What can be checked against the model before any pass: layers, heads, encodings
    and hook points; the injection hook point of each swept layer."""
    dims = model.dims
    for layer in config.layers:
        if not 0 <= layer < dims.n_layers:
            raise BadInputError(
                f"layer {layer} is out of range; the model has {dims.n_layers} layers "
                f"(0-{dims.n_layers - 1})"
            )
    for head in config.heads or ():
        if not 0 <= head < dims.n_heads:
            raise BadInputError(
                f"head {head} is out of range; the model has {dims.n_heads} heads "
                f"(0-{dims.n_heads - 1})"
            )
    for encoding in config.encodings:
        encoding_parts(encoding, registry)  # a known encoder with valid parameters
    hook_names = [injection_hook(model, layer, config.heads) for layer in config.layers]
    missing = [name for name in hook_names if name not in model.bridge.hook_dict]
    if missing:
        raise BadInputError(f"model '{model.name}' has no hook point '{missing[0]}'")
    return hook_names


def with_norms(model: LoadedModel, rows: Sequence[PromptRow], config: SweepConfig) -> SweepConfig:
    """``config`` with its residual-stream norms measured, when its τ units need them and
    it has none: over every row given (the whole dataset, not a shard's: shards must
    scale τ alike to be merged)."""
    if config.tau_units != "resid_norm" or config.resid_norms is not None:
        return config
    norms = residual_norms(model, rows, config.layers)
    return dataclasses.replace(config, resid_norms=tuple(sorted(norms.items())))


def _ranks(batch: Batch) -> np.ndarray:
    """The answer's rank in the batch's last scored pass, as numbers."""
    assert batch.rank is not None
    ranks: np.ndarray = batch.rank.cpu().numpy()
    return ranks


def with_baselines(rows: Sequence[PromptRow], config: SweepConfig) -> SweepConfig:
    """``config`` with each row's shuffled memory drawn over every row given (as
    :func:`with_norms`, the whole dataset, so shards and tasks agree); the shuffled
    baseline is dropped when the dataset has a single memory, which nothing can shuffle,
    and the explicit one when a row has no explicit prompt."""
    if "explicit" in config.baselines and any(row.explicit_prompt is None for row in rows):
        kept = tuple(b for b in config.baselines if b != "explicit")
        config = dataclasses.replace(config, baselines=kept)
    if "shuffled" not in config.baselines or config.shuffled is not None:
        return config
    chosen = with_shuffled(rows, config.seed)
    if chosen is None:
        kept = tuple(b for b in config.baselines if b != "shuffled")
        return dataclasses.replace(config, baselines=kept)
    return dataclasses.replace(config, shuffled=tuple(sorted(chosen.items())))


def run_sweep(
    model: LoadedModel,
    rows: Sequence[PromptRow],
    config: SweepConfig,
    *,
    registry: Registry | None = None,
    progress: bool = False,
    force_full: bool = False,
    done: pd.DataFrame | None = None,
    checkpoint: Callable[[pd.DataFrame], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> SweepResult:
    """Run the sweep over this shard's rows; what and how: see :mod:`meminject.sweep`.

    ``force_full`` disables the replay (every cell runs a whole forward pass with the
    injection hook); it exists for benchmarks and for diagnosing an architecture.
    ``done`` holds records of an earlier, interrupted run with the same settings: rows
    whose every cell is there are not computed again. ``checkpoint`` is called after
    each batch with the records of every finished row so far (``done``'s included), so
    an interruption loses at most one batch. ``advance`` is called with 1 after each
    forward pass, as the progress bar advances (the Ray executor counts its workers'
    passes with it).
    """
    import numpy as np

    from meminject.plugins import get_registry

    registry = registry or get_registry()
    hook_names = check_sweep(model, config, registry)

    started = time.perf_counter()
    config = with_baselines(rows, with_norms(model, rows, config))
    norm_of = dict(config.resid_norms or ())
    shuffled_of = dict(config.shuffled or ())
    mine = shard_rows(rows, config.shard)
    previous = finished_records(done, config) if done is not None else None
    if previous is not None:
        finished_ids = set(previous["row_id"].tolist())
        mine = [row for row in mine if row.row_id not in finished_ids]
    tokenized = [tokenize_row(model, row, config.metric) for row in mine]
    # Prompts scored without any injection besides the row's own: the memory's text before
    # the prompt (in-context) and the explicit, one-hop prompt (what the model knows).
    references: dict[str, list[TokenizedRow]] = {}
    if "in-context" in config.baselines:
        references["in_context"] = [
            tokenize_row(
                model, dataclasses.replace(row, prompt=in_context_prompt(row)), config.metric
            )
            for row in mine
        ]
    if "explicit" in config.baselines:
        references["explicit"] = [
            tokenize_row(
                model, dataclasses.replace(row, prompt=str(row.explicit_prompt)), config.metric
            )
            for row in mine
        ]
    texts = [
        [
            row.memory,
            *([shuffled_of[row.row_id]] if "shuffled" in config.baselines else []),
            *control_texts(model, row, config.controls, config.seed),
        ]
        for row in mine
    ]
    n_var = config.n_variants
    n_rows = len(mine)
    heads: list[int | None] = list(config.heads) if config.heads is not None else [None]
    shape = (
        n_rows,
        len(config.layers),
        len(heads),
        len(config.taus),
        len(config.encodings),
        n_var,
    )
    before = np.zeros(n_rows, dtype=np.float64)
    after_rank = np.zeros(shape, dtype=np.int64)
    # Per row: log p and rank of the answer without the memory, and with each reference.
    per_row: dict[str, np.ndarray] = {"rank_before": np.zeros(n_rows, dtype=np.int64)}
    for name in references:
        per_row[f"logp_{name}"] = np.full(n_rows, np.nan)
        per_row[f"rank_{name}"] = np.zeros(n_rows, dtype=np.int64)
    after = np.zeros(shape, dtype=np.float64)
    share = np.full(shape[:3] + shape[4:], np.nan)  # [R, layers, heads, encodings, variants]
    # Similar lengths together: less padding. Results go back to the rows' own slots.
    batches = batch_indices([len(t.input_ids) for t in tokenized], config.batch_size)
    stats: dict[str, Any] = {
        "rows": n_rows,
        "cells": config.n_cells,
        "base_passes": 0,
        "reference_passes": 0,
        "replays": 0,
        "full_passes": 0,
        "fallback_batches": 0,
        "resumed_rows": 0 if previous is None else previous["row_id"].nunique(),
    }
    finished: list[int] = []
    keep = set(config.layers)
    bridge = model.bridge
    warned = False
    with progress_bar(progress) as bar:
        task = bar.add_task("sweep", total=len(batches) * config.passes_per_batch)
        for members in batches:
            batch = Batch(model, [tokenized[i] for i in members], keep)
            base = batch.base()
            stats["base_passes"] += 1
            before[members] = base.double().cpu().numpy()
            per_row["rank_before"][members] = _ranks(batch)
            for name, prompts in references.items():  # no hook is installed yet
                other = Batch(model, [prompts[i] for i in members], keep)
                per_row[f"logp_{name}"][members] = other.full().double().cpu().numpy()
                per_row[f"rank_{name}"][members] = _ranks(other)
                stats["reference_passes"] += 1
                bar.advance(task)
                if advance is not None:
                    advance(1)
            replay = batch.can_replay and not force_full
            if replay:
                try:
                    check = batch.replay(min(keep))
                    replay = float((check - base).abs().max()) <= REPLAY_TOLERANCE
                except Exception:  # an architecture whose blocks cannot be re-entered
                    replay = False
            if not replay:
                stats["fallback_batches"] += int(not force_full)
            if not replay and not force_full and not warned:
                warnings.warn(
                    f"model '{model.name}': re-running layers from ℓ does not reproduce the "
                    "full forward pass; falling back to full passes (correct, but slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                warned = True
            layer_free: dict[str, Tensor] = {}
            mask = position_mask(batch, [tokenized[i] for i in members], config.positions)
            for li, layer in enumerate(config.layers):
                # [encoding][variant, batch, d_model], computed before the hook goes in.
                vectors = []
                for encoding in config.encodings:
                    entry = registry.encoders[parsed_label(encoding)[0]]
                    if (entry.plugin, entry.name) in LAYER_FREE and encoding in layer_free:
                        vectors.append(layer_free[encoding])
                        continue
                    # Head cells: encoded as memories routed through a head (any head).
                    stacked = encode_batch(
                        model, texts, members, layer, encoding, registry, head=heads[0]
                    )
                    if (entry.plugin, entry.name) in LAYER_FREE:
                        layer_free[encoding] = stacked
                    vectors.append(stacked)
                if config.tau_units == "resid_norm":
                    vectors = [to_norm(v, norm_of[layer]) for v in vectors]
                elif config.control_norm == "memory" and config.controls:
                    first = config.first_control
                    vectors = [controls_at_memory_length(v, first) for v in vectors]
                adder = Adder(mask)
                hook = (hook_names[li], adder)
                with bridge.hooks(fwd_hooks=[hook]):
                    for hi, via in enumerate(heads):
                        for ei, stacked in enumerate(vectors):
                            routed = stacked
                            if via is not None:  # what the head can write (meminject.heads)
                                routed = through_head(model, layer, via, stacked)
                                share[members, li, hi, ei] = head_shares(routed, stacked).T
                            for ti, tau in enumerate(config.taus):
                                for v in range(n_var):
                                    if tau == 0.0:  # the engine installs no hook for τ = 0
                                        after[members, li, hi, ti, ei, v] = before[members]
                                        after_rank[members, li, hi, ti, ei, v] = per_row[
                                            "rank_before"
                                        ][members]
                                        continue
                                    adder.delta = tau * routed[v]
                                    if replay:
                                        logp = batch.replay(layer)
                                        stats["replays"] += 1
                                    else:
                                        logp = batch.full()
                                        stats["full_passes"] += 1
                                    adder.delta = None
                                    after[members, li, hi, ti, ei, v] = logp.double().cpu().numpy()
                                    after_rank[members, li, hi, ti, ei, v] = _ranks(batch)
                                    bar.advance(task)
                                    if advance is not None:
                                        advance(1)
            del batch, layer_free
            finished.extend(members)
            if checkpoint is not None:
                checkpoint(
                    with_previous(
                        previous,
                        subset_records(
                            mine,
                            texts,
                            before,
                            after,
                            share,
                            sorted(finished),
                            config,
                            per_row,
                            after_rank,
                        ),
                    )
                )
    stats["seconds"] = time.perf_counter() - started
    if norm_of:
        stats["resid_norms"] = norm_of
    records = with_previous(
        previous, records_frame(mine, texts, before, after, share, config, per_row, after_rank)
    )
    return SweepResult(records=records, config=config, stats=stats)
