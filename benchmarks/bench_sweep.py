"""Time ``meminject.sweep.run_sweep`` against the plain reference loop.

    python benchmarks/bench_sweep.py                      # GPT-2-small shape, 100 prompts
    python benchmarks/bench_sweep.py --prompts 16 --reference-prompts 2 --threads 2  # quick

What is timed, in one run:

* ``sweep``: ``run_sweep`` on the full grid, every prompt × every (layer, τ) cell
  (100 × 12 layers × 15 τ by default): batched prompts, one base pass per prompt, and
  every cell runs only the layers from ℓ on;
* ``reference``: :func:`meminject.sweep.reference_cell`, one prompt and one cell at a
  time, two forward passes each (before and after) through ``engine.inject``, on every
  prompt (or the first ``--reference-prompts``) but on a stratified sample of the cells,
  one per layer. The i-th layer is paired with τ = ``taus[(i·s) mod T]``, where T is the
  number of τ values and s the largest integer ≤ T/2 coprime with T (7 for the default
  15): i·s mod T is then a permutation of the τ indices, so with no more layers than τ
  values every layer gets a different τ, mixed rather than rising with the layer (by
  default τ = 1, 8, 15, 7, 14, 6, 13, 5, 12, 4, 11, 3 for layers 0…11). The loop is slow
  by design (about 0.4 s per prompt·cell at this size); its cost per prompt·cell is two
  full forward passes whatever the layer and τ, so its throughput on the sample stands
  for the whole grid;
* ``sweep, sampled cells``: ``run_sweep`` once per sampled cell on the same prompts as
  the reference, i.e. on exactly the reference's cells (it then pays a base pass per
  batch for a single cell: the sweep's worst case). ``--skip-sampled-sweep`` leaves it out;
* ``batched`` (only with ``--batched``): ``run_sweep(force_full=True)`` on the full grid:
  batched, but every cell runs the whole model.

Speed-ups compare throughput in prompt·cells per second of wall-clock time; CPU seconds
(``time.process_time``) are printed as well, with the full sweep's speed-up by CPU time,
since other jobs on a shared machine disturb wall-clock time most. Every (prompt, sampled cell)
pair is also checked: the full-grid sweep's p before and after against the reference's
(max |Δp| and max |Δ log p|). The model is a random-weight GPT-2 of the requested shape
(``meminject.testing.build_tiny_model``); random weights time the same as trained ones.
The load average before and after is printed. Prints a markdown table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

WORDS = (
    "the", "capital", "of", "country", "river", "mountain", "leader", "king", "queen", "city",
    "language", "currency", "old", "north", "south", "east", "west", "first", "last", "famous",
    "small", "large", "ancient", "new", "empire", "island", "lake", "author", "painter",
    "scientist", "born", "died", "wrote", "built", "founded", "home", "bridge", "tower",
)  # fmt: skip
NAMES = (
    "Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Berlin", "Madrid", "Vienna",
    "Athens", "Dublin",
)  # fmt: skip


def prompts(n: int, seed: int = 0) -> list:
    from meminject.datasets import PromptRow

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(6, 16)
        prompt = "The " + " ".join(rng.choice(WORDS) for _ in range(length)) + " is"
        memory = " ".join(rng.sample(NAMES, rng.randint(1, 3)))
        rows.append(PromptRow(prompt, memory, rng.choice(NAMES), None, i))
    return rows


def sampled_cells(layers: tuple[int, ...], taus: tuple[float, ...]) -> list[tuple[int, float]]:
    """One cell per layer: layer i gets ``taus[(i·s) mod T]``, s the largest integer ≤ T/2
    that is coprime with T, so the τ indices taken are distinct (while i < T) and mixed."""
    count = len(taus)
    step = next(s for s in range(max(count // 2, 1), 0, -1) if math.gcd(s, count) == 1)
    return [(layer, taus[(i * step) % count]) for i, layer in enumerate(layers)]


def _timed(work: Callable[[], T]) -> tuple[T, tuple[float, float]]:
    """``work()``, and its wall-clock and CPU seconds (CPU time is what other jobs on the
    machine disturb least)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, (time.perf_counter() - start, time.process_time() - cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--n-heads", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--reference-prompts", type=int, default=None, help="default: all")
    parser.add_argument("--taus", default="1-15")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batched", action="store_true", help="also time force_full")
    parser.add_argument("--skip-batched", action="store_true", help="the default; kept")
    parser.add_argument("--skip-sampled-sweep", action="store_true")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from meminject.loading import load_model
    from meminject.specs import parse_float_spec
    from meminject.sweep import SweepConfig, reference_cell, run_sweep
    from meminject.testing import build_tiny_model

    torch.set_num_threads(args.threads)
    rows = prompts(args.prompts)
    ref_rows = rows[: min(args.reference_prompts or args.prompts, args.prompts)]
    taus = tuple(parse_float_spec(args.taus))
    layers = tuple(range(args.n_layers))
    config = SweepConfig(layers=layers, taus=taus, batch_size=args.batch_size)
    sample = sampled_cells(layers, taus)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(
            Path(tmp) / "model", d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads
        )
        model = load_model(path)
        run_sweep(model, rows[:2], SweepConfig(layers=(0,), taus=(1.0,)))  # warm up
        reference_cell(model, rows[0], layer=0, tau=1.0)

        result, t_sweep = _timed(lambda: run_sweep(model, rows, config))
        t_sampled = t_batched = (math.nan, math.nan)
        if not args.skip_sampled_sweep:
            one = [
                SweepConfig(layers=(ly,), taus=(t,), batch_size=args.batch_size) for ly, t in sample
            ]
            _, t_sampled = _timed(lambda: [run_sweep(model, ref_rows, c) for c in one])
        if args.batched:
            _, t_batched = _timed(lambda: run_sweep(model, rows, config, force_full=True))

        def reference() -> dict[tuple[int, int, float], tuple[float, float]]:
            return {
                (row.row_id, layer, tau): reference_cell(model, row, layer=layer, tau=tau)
                for row in ref_rows
                for layer, tau in sample
            }

        ref, t_reference = _timed(reference)
    load_after = os.getloadavg()[0]

    # Every (prompt, sampled cell) pair: the full-grid sweep's p before/after vs the loop's.
    memory = result.records[result.records["kind"] == "memory"]
    indexed = memory.set_index(["row_id", "layer", "tau"])
    ours = indexed.loc[list(ref), ["p_before", "p_after"]].to_numpy()
    theirs = np.array(list(ref.values()), dtype=np.float64)
    worst_abs = float(np.abs(ours - theirs).max())
    worst_log = float(np.abs(np.log(ours) - np.log(theirs)).max())

    n_cells, n_ref = len(layers) * len(taus), len(ref_rows)
    ref_units = len(ref)
    ref_rate = ref_units / t_reference[0]

    def line(method: str, n_prompts: int, cells: int, seconds: tuple[float, float]) -> None:
        rate = n_prompts * cells / seconds[0]
        print(
            f"| {method} | {n_prompts} × {cells} | {n_prompts * cells} | {seconds[0]:.1f} | "
            f"{seconds[1]:.1f} | {rate:.1f} | {rate / ref_rate:.1f}× |"
        )

    shape = f"d_model={args.d_model}, {args.n_layers} layers, {args.n_heads} heads"
    print(f"## sweep vs reference loop ({shape}; {platform.processor() or platform.machine()},")
    print(
        f"torch threads {args.threads}, batch size {args.batch_size}, load average "
        f"{load_before:.1f} → {load_after:.1f})\n"
    )
    print(
        f"Grid: {n_cells} cells = {len(layers)} layers × {len(taus)} τ, encoding unembed. "
        f"The reference loop ran on {n_ref} prompts × {len(sample)} cells, one per layer: "
        f"layer i with τ = taus[(i·s) mod {len(taus)}], s the largest integer ≤ T/2 coprime "
        "with T — (layer, τ) = "
        + ", ".join(f"({layer}, {tau:g})" for layer, tau in sample)
        + ". Its cost per prompt·cell (two full forward passes) does not depend on the "
        "cell, so its throughput on the sample stands for the grid; speed-ups compare "
        "prompt·cells per second of wall-clock time.\n"
    )
    print(
        "| method | prompts × cells | prompt·cells | seconds | CPU seconds | prompt·cells / s "
        "| speed-up |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    line("reference loop, sampled cells", n_ref, len(sample), t_reference)
    if not args.skip_sampled_sweep:
        line("sweep, sampled cells (one run per cell)", n_ref, len(sample), t_sampled)
    if args.batched:
        line("batched full passes, full grid", len(rows), n_cells, t_batched)
    line("sweep (replay from ℓ), full grid", len(rows), n_cells, t_sweep)
    cpu_ratio = (len(rows) * n_cells / t_sweep[1]) / (ref_units / t_reference[1])
    print(f"\nBy CPU seconds rather than wall-clock, the full sweep is {cpu_ratio:.1f}× faster.")
    print(
        f"\nFull-grid sweep vs reference on all {ref_units} (prompt, sampled cell) pairs, "
        f"p before and after: max |Δp| {worst_abs:.2e}, max |Δ log p| {worst_log:.2e}."
    )


if __name__ == "__main__":
    main()
