"""Loading at real sizes: meminject's first and cached load against a minimal
``transformers`` script, side by side (issue: real sizes).

    python benchmarks/bench_loading.py            # writes benchmarks/loading.md
    python benchmarks/bench_loading.py --quick    # SmolLM2 only (a smoke run)

Each measurement is its own child process (peak RSS is the child's VmHWM): the minimal
script loads the checkpoint with ``AutoModelForCausalLM.from_pretrained`` in the dtype
and greedily generates the tokens; meminject's child runs ``load_model`` and
``generate`` with three text memories (resid_pre, a head routed through the attention
output, mlp_out) on the same prompt, the same number of tokens, greedy. "First" runs
with an empty snapshot directory, "cached" with the one the first run left (the
families meminject processes itself write none: both load straight from the
checkpoint). Models: SmolLM2-135M (float32) and Gemma 3 270M (float32 and bfloat16)
from their packages when installed, and a 1.1B-parameter Llama with random weights in
bfloat16 (TinyLlama's shape, SmolLM2's tokenizer) that this script builds in a
temporary folder. Targets (the issue's): peak RSS ≤ 1.2×, whole-process wall time
≤ 1.3×, decoding tokens per second with three memories ≥ 0.97× the minimal script's.
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
PROMPT = "The capital city of Nepal is located in"
NEW = 32

PLAIN = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
source, dtype, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).eval()
tokenizer = AutoTokenizer.from_pretrained(source)
ids = tokenizer(sys.argv[4], return_tensors="pt", add_special_tokens=False).input_ids
if sys.argv[5] == "1":
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
start = time.perf_counter()
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
decode = time.perf_counter() - start
peak = max(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"tokens": out[0, ids.shape[1]:].tolist(), "decode_s": decode, "peak": peak}))
"""

MEMINJECT = r"""
import json, sys, time
import meminject
source, dtype, new, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = meminject.load_model(source, dtype=dtype, prepend_bos=sys.argv[5] == "1")
n = model.dims.n_layers
memories = [
    {"name": "a", "text": "Kathmandu", "layer": n // 3, "tau": 2.0, "site": "resid_pre"},
    {"name": "b", "text": "Nepal", "layer": n // 2, "tau": 2.0, "head": 1},
    {"name": "c", "text": "Himalaya", "layer": 2 * n // 3, "tau": 2.0, "site": "mlp_out"},
]
compiled = meminject.compile_memories(model, memories)
start = time.perf_counter()
result = meminject.generate(
    model, prompt, compiled, max_new_tokens=new, stop_at_eos=False
)
decode = time.perf_counter() - start
check = time.perf_counter()
plain = meminject.generate(model, prompt, max_new_tokens=new, stop_at_eos=False)
check_s = time.perf_counter() - check
peak = max(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({
    "tokens": result.new_tokens, "plain_tokens": plain.new_tokens, "decode_s": decode,
    "check_s": check_s,
    "peak": peak, "backend": result.backend, "bridge": model.has_bridge,
    "tl": any(m.startswith("transformer_lens") for m in sys.modules),
}))
"""


def child(code: str, args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    """(wall seconds, the child's report). meminject's child also generates once
    without memories, to compare its tokens with the plain script's; that check is
    work the plain script does not do, so its time is taken out of the wall time."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return wall - report.get("check_s", 0.0), report


def fastest(runs: list[tuple[float, dict]]) -> tuple[float, dict]:
    """Of repeated runs, the one with the least wall time, its decode rate the best of
    all: on a shared machine the least-disturbed run is the closest to the true cost."""
    wall, report = min(runs, key=lambda run: run[0])
    return wall, {**report, "decode_s": min(r["decode_s"] for _, r in runs)}


def build_llama_1b(folder: Path, tokenizer_dir: Path) -> Path:
    """A 1.1B-parameter Llama (TinyLlama's shape) with random weights, in bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def real_dirs() -> dict[str, Path]:
    from meminject import gguf_cache
    from meminject.plugins import get_registry

    out = {}
    registry = get_registry()
    for name in ("smollm2-135m", "gemma3-270m"):
        try:
            target = registry.models[name].loader(device=None, dtype=None)
        except Exception:  # not installed
            continue
        out[name] = Path(gguf_cache.dequantized_dir(target))
    return out


def measure(
    label: str, source: Path, dtype: str, work: Path, repeat: int, bos: bool = False
) -> dict:
    """The plain script, meminject's first load and its cached load, interleaved
    ``repeat`` times (each first load with an empty snapshot directory)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    args = [str(source), dtype, str(NEW), PROMPT, "1" if bos else "0"]
    runs: dict[str, list[tuple[float, dict]]] = {"plain": [], "first": [], "cached": []}
    for attempt in range(repeat):
        snaps = {"MEMINJECT_SNAPSHOTS": str(work / f"snaps-{label}-{dtype}-{attempt}")}
        runs["plain"].append(child(PLAIN, args, env))
        runs["first"].append(child(MEMINJECT, args, {**env, **snaps}))
        runs["cached"].append(child(MEMINJECT, args, {**env, **snaps}))
    return {"label": label, "dtype": dtype, **{k: fastest(v) for k, v in runs.items()}}


def table(rows: list[dict]) -> str:
    lines = [
        "| model | dtype | run | peak RSS MiB | × plain | wall s | × plain | decode tok/s "
        "(3 memories) | × plain | TransformerLens imported | same tokens as plain |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        plain_wall, plain = row["plain"]
        plain_rate = NEW / plain["decode_s"]
        lines.append(
            f"| {row['label']} | {row['dtype']} | plain transformers | {plain['peak']:,.0f} | 1 | "
            f"{plain_wall:.1f} | 1 | {plain_rate:.2f} | 1 | – | – |"
        )
        for run in ("first", "cached"):
            wall, got = row[run]
            rate = NEW / got["decode_s"]
            lines.append(
                f"| {row['label']} | {row['dtype']} | meminject, {run} load | "
                f"{got['peak']:,.0f} | **{got['peak'] / plain['peak']:.2f}** | {wall:.1f} | "
                f"**{wall / plain_wall:.2f}** | {rate:.2f} | **{rate / plain_rate:.2f}** | "
                f"{'yes' if got['tl'] else 'no'} | "
                f"{'yes' if got['plain_tokens'] == plain['tokens'] else 'NO'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only")
    parser.add_argument("--out", type=Path, default=HERE / "loading.md")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each row (fastest kept)")
    args = parser.parse_args()
    dirs = real_dirs()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="meminject-bench-loading-") as tmp:
        work = Path(tmp)
        if "smollm2-135m" in dirs:
            rows.append(measure("SmolLM2-135M", dirs["smollm2-135m"], "float32", work, args.repeat))
        if not args.quick and "gemma3-270m" in dirs:
            gemma = dirs["gemma3-270m"]
            for dtype in ("float32", "bfloat16"):
                rows.append(measure("Gemma 3 270M", gemma, dtype, work, args.repeat, bos=True))
        if not args.quick and "smollm2-135m" in dirs:
            big = build_llama_1b(work / "llama-1.1b", dirs["smollm2-135m"])
            rows.append(measure("Llama 1.1B (random)", big, "bfloat16", work, args.repeat))
    text = (
        "# Loading at real sizes\n\n"
        f"`python benchmarks/bench_loading.py` on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; one prompt, "
        f"{NEW} new tokens, greedy (BOS first for Gemma, as its convention). Each row is "
        "its own process; × is against the plain `transformers` row above it, measured "
        f"in the same run. Each row ran {args.repeat} times, interleaved with the others "
        "of its model; the table keeps the run with the least wall time and the best "
        "decode rate. meminject's wall time leaves out its check generation (the same "
        "prompt without memories, whose tokens the last column compares). "
        f"Load average {load_before:.2f} before the run and "
        f"{os.getloadavg()[0]:.2f} after (2 cores: above 2, other work shared them).\n\n"
        + table(rows)
        + "\n"
    )
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
