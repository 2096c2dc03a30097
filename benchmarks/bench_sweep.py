"""Time ``meminject.sweep.run_sweep`` against the plain reference loop on the same cells.

    python benchmarks/bench_sweep.py                      # GPT-2-small shape, 100 prompts
    python benchmarks/bench_sweep.py --reference-prompts 10 --threads 2

Three ways to compute the same numbers, measured side by side in one run:

* ``reference``: :func:`meminject.sweep.reference_cell`, one prompt and one cell at a
  time, two forward passes each (before and after), through ``engine.inject``;
* ``batched``: ``run_sweep(force_full=True)``: batched prompts, one base pass per prompt,
  but every cell runs the whole model;
* ``sweep``: ``run_sweep``: batched, and every cell runs only the layers from ℓ on.

The reference loop is slow by design; ``--reference-prompts`` runs it on the first M
prompts only, and the speed ratio compares it with the sweep on those same M prompts
(the sweep is also timed on all prompts). The model is a random-weight GPT-2 of the
requested shape (``meminject.testing.build_tiny_model``); random weights time the same
as trained ones. Prints a markdown table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--n-heads", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--reference-prompts", type=int, default=None, help="default: all")
    parser.add_argument("--taus", default="1-15")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip-batched", action="store_true", help="don't time force_full")
    args = parser.parse_args()

    import torch

    from meminject.models import load_model
    from meminject.specs import parse_float_spec
    from meminject.sweep import SweepConfig, reference_cell, run_sweep
    from meminject.testing import build_tiny_model

    torch.set_num_threads(args.threads)
    rows = prompts(args.prompts)
    n_ref = min(args.reference_prompts or args.prompts, args.prompts)
    taus = tuple(parse_float_spec(args.taus))
    layers = tuple(range(args.n_layers))
    config = SweepConfig(layers=layers, taus=taus, batch_size=args.batch_size)
    n_cells = len(layers) * len(taus)

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(
            Path(tmp) / "model", d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads
        )
        model = load_model(path)
        run_sweep(model, rows[:2], SweepConfig(layers=(0,), taus=(1.0,)))  # warm up

        start = time.perf_counter()
        fast_ref = run_sweep(model, rows[:n_ref], config).records
        t_sweep_ref = time.perf_counter() - start
        start = time.perf_counter()
        run_sweep(model, rows, config)
        t_sweep_all = time.perf_counter() - start
        t_batched = math.nan
        if not args.skip_batched:
            start = time.perf_counter()
            run_sweep(model, rows[:n_ref], config, force_full=True)
            t_batched = time.perf_counter() - start

        worst_abs = worst_rel = 0.0
        start = time.perf_counter()
        for rec in fast_ref.itertuples(index=False):
            before, after = reference_cell(
                model, rows[rec.row_id], layer=int(rec.layer), tau=float(rec.tau)
            )
            for ours, theirs in ((rec.p_before, before), (rec.p_after, after)):
                worst_abs = max(worst_abs, abs(ours - theirs))
                worst_rel = max(worst_rel, abs(math.log(ours) - math.log(theirs)))
        t_reference = time.perf_counter() - start

    shape = f"d_model={args.d_model}, {args.n_layers} layers, {args.n_heads} heads"
    print(f"## sweep vs reference loop ({shape}; {platform.processor() or platform.machine()},")
    print(f"torch threads {args.threads}, batch size {args.batch_size})\n")
    print(f"{n_cells} cells = {len(layers)} layers × {len(taus)} τ, encoding unembed.\n")
    print("| method | prompts | seconds | prompt·cells / s | speed-up vs reference |")
    print("| --- | ---: | ---: | ---: | ---: |")
    units = n_ref * n_cells
    print(f"| reference loop | {n_ref} | {t_reference:.1f} | {units / t_reference:.1f} | 1.0× |")
    if not args.skip_batched:
        print(
            f"| batched, full passes | {n_ref} | {t_batched:.1f} | {units / t_batched:.1f} | "
            f"{t_reference / t_batched:.1f}× |"
        )
    print(
        f"| sweep (replay from ℓ) | {n_ref} | {t_sweep_ref:.1f} | {units / t_sweep_ref:.1f} | "
        f"{t_reference / t_sweep_ref:.1f}× |"
    )
    if n_ref != args.prompts:
        all_units = args.prompts * n_cells
        print(
            f"| sweep (replay from ℓ) | {args.prompts} | {t_sweep_all:.1f} | "
            f"{all_units / t_sweep_all:.1f} | – |"
        )
    print(
        f"\nmax |Δp| sweep vs reference over {units} prompt·cells: {worst_abs:.2e} "
        f"(max |Δ log p| {worst_rel:.2e})"
    )


if __name__ == "__main__":
    main()
