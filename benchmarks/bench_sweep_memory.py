"""Peak resident memory of ``meminject.sweep.run_sweep`` against cells and batch size.

    python benchmarks/bench_sweep_memory.py                 # GPT-2-small shape, ~12 min
    python benchmarks/bench_sweep_memory.py --tau-counts 1,5 --batch-sizes 8,16   # quicker

Every configuration runs in a fresh Python process (this script with ``--child``): it
loads the model, returns the heap loading freed to the OS (``gc.collect``, glibc's
``malloc_trim``; without it the resident set after loading varies by ~300 MiB from run to
run), resets its peak-RSS mark (``echo 5 > /proc/self/clear_refs``, Linux),
runs one sweep (or nothing: the baseline) and prints its own peak resident set size,
``getrusage(RUSAGE_SELF).ru_maxrss``, as one JSON line. Loading the model peaks far above
what the sweep needs (weights are copied while the bridge is built), so without the reset
every row would show the loading peak; that peak is reported in a column of its own.

Two series: the number of cells grows at a fixed prompt count and batch size (16
prompts in batches of 8; every layer × 1, 5, 15, 45 τ values spread over 1…15: 12 to 540
cells), then the batch size grows (8, 16, 32) at a fixed cell count (32 prompts, 12
cells). The prompt counts are kept small so the whole script runs in minutes. The
"records" column is the size of the returned records table
(``DataFrame.memory_usage(deep=True)``): the sweep's output, one row per prompt·cell by
definition. The model is a random-weight GPT-2 of the requested shape
(``meminject.testing.build_tiny_model``). Prints a markdown table. Not part of the test
suite.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def child(args: argparse.Namespace) -> None:
    """Load the model, run one sweep (none when ``--n-taus 0``), print peak RSS as JSON."""
    import torch
    from bench_sweep import prompts  # this script's own folder is sys.path[0]

    from meminject.loading import load_model
    from meminject.sweep import SweepConfig, run_sweep

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    out = {"seconds": 0.0, "records_bytes": 0}
    out["load_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # glibc: hand loading's freed heap back to the OS
    with open("/proc/self/clear_refs", "w") as marks:
        marks.write("5")  # reset the peak: from here ru_maxrss is the run's own peak
    if args.n_taus > 0:
        n = args.n_taus
        taus = tuple(1.0 + 14.0 * k / max(n - 1, 1) for k in range(n))
        config = SweepConfig(
            layers=tuple(range(model.dims.n_layers)), taus=taus, batch_size=args.batch_size
        )
        start = time.perf_counter()
        records = run_sweep(model, prompts(args.prompts), config).records
        out["seconds"] = time.perf_counter() - start
        out["records_bytes"] = int(records.memory_usage(deep=True).sum())
    out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(out))


def measure(model: Path, prompts: int, n_taus: int, batch_size: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", "--model", str(model)]
    command += ["--prompts", str(prompts), "--n-taus", str(n_taus)]
    command += ["--batch-size", str(batch_size), "--threads", str(threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--n-heads", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=16, help="for the cells series")
    parser.add_argument("--tau-counts", default="1,5,15,45", help="cells = layers × each")
    parser.add_argument("--batch-size", type=int, default=8, help="for the cells series")
    parser.add_argument("--batch-prompts", type=int, default=32, help="for the batch series")
    parser.add_argument("--batch-sizes", default="8,16,32", help="for the batch series")
    parser.add_argument("--batch-taus", type=int, default=1, help="τ count, batch series")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--n-taus", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return

    from meminject.testing import build_tiny_model

    # (series, prompts, τ count, batch size); τ count 0: load the model and run nothing.
    runs = [("baseline: model loaded, no sweep", 0, 0, 0)]
    runs += [("cells grow", args.prompts, n, args.batch_size) for n in _ints(args.tau_counts)]
    runs += [
        ("batch size grows", args.batch_prompts, args.batch_taus, b)
        for b in _ints(args.batch_sizes)
    ]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(
            Path(tmp) / "model", d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads
        )
        for label, n_prompts, n_taus, batch in runs:
            result = measure(path, n_prompts, n_taus, max(batch, 1), args.threads)
            results.append((label, n_prompts, n_taus, batch, result))
    base = results[0][4]["maxrss_kib"] / 1024

    shape = f"d_model={args.d_model}, {args.n_layers} layers, {args.n_heads} heads"
    print(f"## sweep peak resident memory ({shape}; {platform.processor() or platform.machine()},")
    print(f"torch threads {args.threads}, load average {load:.1f} → {os.getloadavg()[0]:.1f})\n")
    print(
        f"One fresh process per row; cells = {args.n_layers} layers "
        "× n τ (spread over 1…15), encoding unembed. *Peak* is the process's ru_maxrss after "
        "the model is loaded and the mark reset, i.e. the largest resident set while the "
        "sweep ran (the baseline row: the model loaded, nothing run). *Load peak* is "
        "ru_maxrss before the reset.\n"
    )
    print(
        "| series | prompts | cells | batch size | seconds | peak (MiB) | over baseline (MiB) "
        "| records table (MiB) | load peak (MiB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, n_prompts, n_taus, batch, r in results:
        peak, load_peak = r["maxrss_kib"] / 1024, r["load_maxrss_kib"] / 1024
        count, cells, size, secs, table = "–", "–", "–", "–", "–"
        if n_taus:
            count, cells, size = str(n_prompts), str(args.n_layers * n_taus), str(batch)
            secs, table = f"{r['seconds']:.1f}", f"{r['records_bytes'] / 2**20:.2f}"
        print(
            f"| {label} | {count} | {cells} | {size} | {secs} | {peak:.0f} | {peak - base:+.0f} | "
            f"{table} | {load_peak:.0f} |"
        )


if __name__ == "__main__":
    main()
