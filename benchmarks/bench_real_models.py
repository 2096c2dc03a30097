"""Load times and peak memory of the real model sources, first load and cached.

    python benchmarks/bench_real_models.py          # writes benchmarks/real_models.md

Each measurement runs in its own child process, so peak resident memory is that of
one load (and one generation), not of everything before it. The first load uses an
empty cache folder (assembling chunks, dequantizing, writing the Hugging Face
directory, then booting the bridge); the cached load reuses that folder. Sources
that are not installed are listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from meminject.loading import load_model
from meminject.generation import generate
model = load_model(sys.argv[1])
loaded = time.perf_counter() - start
out = {"load_s": loaded}
if sys.argv[2] == "generate":
    generate(model, "The capital of France is", max_new_tokens=2)  # fast-path probe, warm-up
    t = time.perf_counter()
    result = generate(model, "The capital city of Nepal is located in", max_new_tokens=32,
                      stop_at_eos=False)
    out["tok_per_s"] = len(result.new_tokens) / (time.perf_counter() - t)
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def child(name: str, cache: Path, mode: str) -> dict[str, float]:
    env = dict(os.environ, MEMINJECT_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, name, mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, float] = json.loads(line[len("RESULT ") :])
    result["process_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "real_models.md")
    args = parser.parse_args()
    from meminject import model_sources

    lines = [
        "# Real model sources: load time and memory",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}; "
        f"load average before the run {os.getloadavg()[0]:.2f}",
        "- command: `python benchmarks/bench_real_models.py` (each row is its own process)",
        "",
        "| model | step | load (s) | whole process (s) | peak RSS (MiB) | tok/s (32 new, hf) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory(prefix="meminject-bench-cache-") as tmp:
        for source in model_sources.SOURCES.values():
            if source.where() is None:
                lines.append(f"| {source.name} | not installed | | | | |")
                continue
            cache = Path(tmp) / source.name
            for step, mode in (
                ("first load", "load"),
                ("cached load", "load"),
                ("cached load + generate", "generate"),
            ):
                r = child(source.name, cache, mode)
                tok = f"{r['tok_per_s']:.1f}" if "tok_per_s" in r else ""
                lines.append(
                    f"| {source.name} | {step} | {r['load_s']:.1f} | {r['process_s']:.1f} | "
                    f"{r['peak_rss_mib']:.0f} | {tok} |"
                )
                print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
