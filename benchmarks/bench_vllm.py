"""Memories in vLLM: their cost to vLLM's throughput, and vLLM against meminject's own
``hf`` backend, on the same prompts, in one run (issue 30).

    python benchmarks/bench_vllm.py            # writes benchmarks/vllm.md
    python benchmarks/bench_vllm.py --repeats 1 --tokens 8   # a smoke run

Run it with a Python where ``vllm`` imports (docs/vllm.md); on CPU set
``VLLM_CPU_KVCACHE_SPACE=1``. SmolLM2-135M in float32, greedy, a fixed number of new
tokens (end of text ignored), prefix caching off (the runs repeat the same prompts, and
a cached prefix would favour whichever run came second). One vLLM engine and one
meminject-loaded model in this process; at batch 1 and at batch 16, each of these runs:

* vLLM without memories, with one memory set (every request the same set), and, at
  batch 16, with 16 different sets (one per request, in the same batch);
* meminject's ``hf`` backend on the same prompts, without memories and with the set.

Each run is repeated ``--repeats`` times, the runs interleaved (every run once, then
again), and the fastest of each is kept. Throughput is generated tokens per second of
wall time for the whole batch. Load time: ``load_model`` for meminject, and vLLM's
engine start (``vllm.LLM``: processes, weights, KV cache) for vLLM. Targets (the
issue's): one set ≥ 0.95× vLLM without memories, 16 sets in a batch of 16 ≥ 0.9×.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "The capital city of Nepal is located in",
    "My favourite food is",
    "The best way to learn a language is",
    "Once upon a time, in a small village,",
    "The sun rises in the",
    "Water boils at a temperature of",
    "The most popular sport in the world is",
    "A good friend is someone who",
    "In the year 2050, cars will",
    "The city of Tokyo lies in the country of",
    "My grandmother always told me that",
    "The most important invention of the last century was",
    "Scientists have recently discovered that",
    "The recipe for a good cake starts with",
    "On a rainy day, I like to",
    "The history of the Roman empire",
]
WORDS = [
    " ocean", " music", " green", " calm", " fire", " cold", " gold", " night",
    " love", " war", " bread", " stone", " river", " glass", " storm", " honey",
]  # fmt: skip


def one_set() -> list[dict[str, Any]]:
    """Three memories: an add at resid_post, an add at attn_out on the prompt, and an
    add at mlp_out on the last prompt token (the sites and positions the tier tests)."""
    return [
        {"name": "ocean", "text": " ocean", "layer": 6, "tau": 4.0, "site": "resid_post"},
        {"name": "music", "text": " music", "layer": 4, "tau": 3.0, "site": "attn_out",
         "positions": "prompt"},
        {"name": "green", "text": " green", "layer": 9, "tau": 5.0, "site": "mlp_out",
         "positions": "last"},
    ]  # fmt: skip


def sixteen_sets() -> list[list[dict[str, Any]]]:
    """16 different sets: each a resid_post memory of its own word and layer."""
    return [
        [{"name": f"w{i}", "text": word, "layer": 3 + i % 20, "tau": 4.0, "site": "resid_post"}]
        for i, word in enumerate(WORDS)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=HERE / "vllm.md")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from meminject.engine import compile_memories
    from meminject.generation import DecodeOptions, generate_batch
    from meminject.loading import load_model
    from meminject.vllm_backend import prepare, start_engine
    from meminject.vllm_backend.plan import compile_plan

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    model = load_model("smollm2-135m", dtype="float32")
    meminject_load = time.perf_counter() - started
    tokens, source, dtype = prepare(model)
    engine = start_engine(tokens, source, dtype, enable_prefix_caching=False)
    options = DecodeOptions(max_new_tokens=args.tokens, stop_at_eos=False)
    plan = compile_plan(model, one_set())
    plans16 = [compile_plan(model, s) for s in sixteen_sets()]
    compiled = compile_memories(model, one_set())
    compiled16 = [compile_memories(model, s) for s in sixteen_sets()]

    def vllm_run(prompts: list[str], memories: list[Any] | None) -> tuple[float, list[Any]]:
        engine.install(None)
        start = time.perf_counter()
        out = engine.generate(prompts, options, memories=memories)
        return time.perf_counter() - start, out

    def hf_run(prompts: list[str], memories: Any) -> tuple[float, list[Any]]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = generate_batch(
                model,
                prompts,
                memories_per_prompt=memories,
                options=options,
                batch_size=len(prompts),
                backend="hf",
            )
        return time.perf_counter() - start, out

    runs: dict[tuple[int, str], Any] = {}
    for batch in (1, 16):
        prompts = PROMPTS[:batch]
        runs[(batch, "vLLM, no memories")] = lambda p=prompts: vllm_run(p, None)
        runs[(batch, "vLLM, one set (3 memories)")] = lambda p=prompts: vllm_run(p, [plan] * len(p))
        if batch == 16:
            runs[(batch, "vLLM, 16 different sets")] = lambda p=prompts: vllm_run(p, plans16)
        runs[(batch, "hf backend, no memories")] = lambda p=prompts: hf_run(p, [None] * len(p))
        runs[(batch, "hf backend, one set (3 memories)")] = lambda p=prompts: hf_run(
            p, [compiled] * len(p)
        )
        if batch == 16:
            runs[(batch, "hf backend, 16 different sets")] = lambda p=prompts: hf_run(p, compiled16)
    # Warm both engines once (first-call costs are not throughput).
    vllm_run(PROMPTS[:2], [plan, None])
    hf_run(PROMPTS[:2], [compiled, None])
    best: dict[tuple[int, str], float] = {}
    outputs: dict[tuple[int, str], list[Any]] = {}
    for _ in range(args.repeats):
        for key, run in runs.items():
            seconds, out = run()
            best[key] = min(best.get(key, float("inf")), seconds)
            outputs[key] = out
    engine_load = engine.load_seconds
    engine.close()

    def same(a: str, b: str, batch: int) -> str:
        left, right = outputs[(batch, a)], outputs[(batch, b)]
        equal = sum(x.new_tokens == y.new_tokens for x, y in zip(left, right, strict=True))
        return f"{equal}/{len(left)}"

    rows = []
    for batch in (1, 16):
        base = best[(batch, "vLLM, no memories")]
        for (b, name), seconds in best.items():
            if b != batch:
                continue
            rate = batch * args.tokens / seconds
            ratio = base / seconds
            match = "–"
            if name.startswith("vLLM") and name != "vLLM, no memories":
                twin = "hf backend" + name[len("vLLM") :]
                match = same(name, twin, batch)
            elif name == "vLLM, no memories":
                match = same(name, "hf backend, no memories", batch)
            rows.append(
                f"| {batch} | {name} | {seconds:.2f} | {rate:.1f} | **{ratio:.2f}** | {match} |"
            )
    text = (
        "# Memories in vLLM: throughput and load time\n\n"
        f"`python benchmarks/bench_vllm.py` on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, vLLM's CPU build; SmolLM2-135M in float32, "
        f"greedy, {args.tokens} new tokens per request (end of text ignored), prefix caching "
        f"off; each run {args.repeats} times, interleaved, fastest kept. Load average "
        f"{load_before:.2f} before the run and {os.getloadavg()[0]:.2f} after (2 cores: above "
        "2, other work shared them, so compare the ratios, not the seconds).\n\n"
        "| batch | run | seconds | tokens/s | × vLLM without memories | same tokens as hf |\n"
        "| ---: | --- | ---: | ---: | ---: | --- |\n" + "\n".join(rows) + "\n\n"
        "Targets: one set ≥ 0.95× vLLM without memories; 16 different sets in a batch of "
        '16 ≥ 0.9×. "same tokens as hf": requests whose greedy tokens equal the hf '
        "backend's run with the same memories.\n\n"
        "| load | seconds |\n| --- | ---: |\n"
        f"| meminject `load_model` (SmolLM2, float32, cached dequantized checkpoint) | "
        f"{meminject_load:.1f} |\n"
        f"| vLLM engine start (`vllm.LLM`: engine process, weights, KV cache) | "
        f"{engine_load:.1f} |\n"
    )
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":  # vLLM starts its engine core in a spawned process
    main()
