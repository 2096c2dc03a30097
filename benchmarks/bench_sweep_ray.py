"""Time a sweep run locally against the same sweep on Ray (``--executor ray``), side by
side in one process, and check that both give the same records.

    python benchmarks/bench_sweep_ray.py                  # tiny GPT-2 and toyworld
    python benchmarks/bench_sweep_ray.py --skip-toyworld  # the tiny model only (~1 min)

What is timed, per workload, in this order:

* ``local, 1 thread`` and ``local, N threads``: :func:`meminject.sweep.run_sweep` in
  this process with one torch thread and with ``--threads`` (default: every core, as
  ``meminject sweep`` runs). On a shared, busy machine several threads can be far slower
  than one for small matrices (they spin waiting for each other), hence both;
* ``ray, cold``: ``ray.init`` of a new local instance with ``--workers`` CPUs, then
  :func:`meminject.sweep.run_sweep_ray` with one torch thread per task: Ray's start, each
  worker process importing torch and TransformerLens and loading the model, the tasks
  and the gathering. This is what one ``meminject sweep --executor ray`` run pays;
* ``ray, warm``: the same call again on the same instance, whose workers still hold the
  model: what the sweep itself costs on Ray, without the start-up.

The model is loaded once, before the timings, for the local run and the driver; its
load is not timed. "Ray = local" compares the Ray runs' records with a local run's,
every column to the last bit; against the N-thread local run the largest difference of
log p is printed when they differ (a sum over N threads can round differently). Ray's
token authentication is turned off for the throwaway instance (``RAY_AUTH_MODE=disabled``)
and the instance is shut down at the end. Prints a markdown table and the load average
before and after; the table in ``benchmarks/sweep_ray.md`` is its output. Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _rows_tiny(n: int) -> list[Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_sweep import prompts

    return prompts(n)


def _max_dlogp(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.nanmax(np.abs(a["logp_after"].to_numpy() - b["logp_after"].to_numpy())))


def _same(a: Any, b: Any) -> bool:
    import pandas as pd

    try:
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    except AssertionError:
        return False
    return True


def _timed(label: str, run: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return result, seconds


def bench(name: str, model: Any, rows: list[Any], config: Any, args: argparse.Namespace) -> str:
    import ray
    import torch

    from meminject.sweep import run_sweep, run_sweep_ray

    torch.set_num_threads(1)
    local_1, t_local_1 = _timed(f"{name}: local, 1 thread", lambda: run_sweep(model, rows, config))
    torch.set_num_threads(args.threads)
    local_n, t_local_n = _timed(
        f"{name}: local, {args.threads} threads", lambda: run_sweep(model, rows, config)
    )
    torch.set_num_threads(1)  # the driver only tokenizes and gathers

    def cold() -> Any:
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        return run_sweep_ray(model, rows, config)

    on_ray, t_cold = _timed(f"{name}: Ray cold", cold)
    again, t_warm = _timed(f"{name}: Ray warm", lambda: run_sweep_ray(model, rows, config))
    ray.shutdown()

    passes = local_1.stats["replays"] + local_1.stats["full_passes"]
    same_1 = _same(on_ray.records, local_1.records) and _same(again.records, local_1.records)
    same_n = _same(on_ray.records, local_n.records)
    versus_n = "yes" if same_n else f"max Δlog p {_max_dlogp(on_ray.records, local_n.records):.0e}"
    return (
        f"| {name} | {len(rows)} | {config.n_cells} | {passes} | {on_ray.stats['tasks']} | "
        f"{t_local_1:.1f} | {t_local_n:.1f} | {t_cold:.1f} | {t_warm:.1f} | "
        f"{'yes' if same_1 else 'NO'} | {versus_n} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the Ray instance")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tiny-prompts", type=int, default=64)
    parser.add_argument("--toyworld-prompts", type=int, default=224)
    parser.add_argument("--skip-toyworld", action="store_true")
    args = parser.parse_args()

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MEMINJECT_LOAD_PLUGINS", "")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from meminject.loading import load_model
    from meminject.sweep import SweepConfig
    from meminject.testing import build_tiny_model

    load_before = os.getloadavg()
    lines = [
        f"| workload | prompts | cells | passes | Ray tasks | local 1 thread, s | local "
        f"{args.threads} threads, s | Ray cold, s | Ray warm, s | Ray = local 1 thread | "
        f"Ray = local {args.threads} threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_model(build_tiny_model(Path(tmp) / "gpt2", "gpt2"), bridge=True)
        config = SweepConfig(
            layers=(0, 1),
            taus=(1.0, 2.0, 4.0, 8.0),
            encodings=("unembed", "embed"),
            controls=3,
            batch_size=16,
        )
        lines.append(bench("tiny GPT-2 (d 64, 2 layers)", tiny, _rows_tiny(args.tiny_prompts),
                           config, args))  # fmt: skip
    if not args.skip_toyworld:
        from meminject.default_plugins.datasets import load_toyworld

        toy = load_model("toyworld", bridge=True)
        config = SweepConfig(
            layers=(0, 1, 2, 3),
            taus=(1.0, 2.0, 4.0, 8.0),
            encodings=("unembed", "embed"),
            controls=3,
            batch_size=16,
        )
        rows = load_toyworld(limit=args.toyworld_prompts)
        lines.append(bench("toyworld (d 128, 4 layers)", toy, rows, config, args))
    load_after = os.getloadavg()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; local run: "
        f"{args.threads} torch threads; Ray: a local instance of {args.workers} CPUs, one "
        f"task per CPU at a time, one torch thread each; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
