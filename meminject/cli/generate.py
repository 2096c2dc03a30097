"""The ``meminject generate`` command (click): one prompt, or a JSONL file of them in
batches, with a memory set (or, per line, some of its memories) injected.

Like every command it imports torch only inside its body. The decoding options are
``transformers``' names: ``--top-k``/``--top-p`` filter sampling, and ``--show-top``
is how many most likely next tokens to print (it was ``--top-k`` before sampling
filters existed; the two now coexist).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from meminject.cli.options import (
    file_in_option,
    load_cli_model,
    memories_option,
    model_option,
    number_option,
    outside_paths_option,
)
from meminject.errors import BadInputError


@click.command()
@click.argument("prompt", required=False)
@memories_option("Memory file or directory (repeatable).")
@file_in_option(
    "--prompts",
    "prompts_file",
    help='A JSONL file, one request a line: {"prompt": …, "memories": [names], '
    "options…}; prints one JSON result a line (instead of PROMPT).",
)
@file_in_option(
    "-o",
    "--output",
    help="With --prompts: write the JSONL results here (atomically) instead of stdout.",
)
@number_option(
    "--batch-size", 8, click.IntRange(1, 4096), "Prompts per forward pass with --prompts."
)
@model_option("files")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(0, 4096))
@number_option("--temperature", 0.0, click.FloatRange(0), "0 is greedy decoding.")
@number_option(
    "--top-k", 0, click.IntRange(0), "Sample only from the k most likely tokens (0: all)."
)
@number_option(
    "--top-p",
    1.0,
    click.FloatRange(0, 1, min_open=True),
    "Sample only from the most likely tokens whose probabilities sum to p.",
)
@number_option(
    "--repetition-penalty",
    1.0,
    click.FloatRange(0, min_open=True),
    "Divide the scores of tokens already seen by this (transformers' meaning).",
)
@click.option("--seed", default=None, type=click.IntRange(0, 2**64 - 1), help="Seed for sampling.")
@click.option("--stop", multiple=True, help="End the completion before this string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-text token.")
@click.option(
    "--chat",
    is_flag=True,
    help="Wrap the prompt in the tokenizer's chat template (for instruct models).",
)
@number_option("--show-top", 5, click.IntRange(0), "How many most likely next tokens to show.")
@click.option("--compare", is_flag=True, help="Show the baseline beside the injected run.")
@click.option("--no-kv-cache", is_flag=True, help="Recompute the whole sequence each step.")
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    help="hf: the plain Hugging Face modules over the bridge's weights, hooked only at the "
    "memories' sites (fastest); bridge: TransformerBridge (every hook point); vllm: vLLM's "
    "engine with the memories rebuilt in its workers (docs/vllm.md); a plugin's backend by "
    "name; auto: the first that serves every site.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@outside_paths_option
def generate(
    prompt: str | None,
    memory_paths: Sequence[str],
    prompts_file: str | None,
    output: str | None,
    batch_size: int,
    model_name: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
    stop: tuple[str, ...],
    ignore_eos: bool,
    chat: bool,
    show_top: int,
    compare: bool,
    no_kv_cache: bool,
    backend: str,
    as_json: bool,
    allow_outside_paths: bool,
) -> None:
    """Generate a completion of PROMPT (or of every line of --prompts) with a memory set
    injected."""
    from meminject.loading import load_memories

    if (prompt is None) == (prompts_file is None):
        raise BadInputError("give a PROMPT or --prompts FILE.jsonl (one of them)")
    if output is not None and prompts_file is None:
        raise BadInputError("--output goes with --prompts")
    requests = None
    if prompts_file is not None:
        from meminject.prompt_file import read_prompt_requests

        requests = read_prompt_requests(prompts_file)  # checked before the model loads
    memory_set = load_memories(memory_paths) if memory_paths else None
    if requests is not None:
        _check_names(requests, memory_set)
    if backend == "vllm":
        if no_kv_cache:
            raise BadInputError("--no-kv-cache does not apply to --backend vllm")
        from meminject.vllm_backend import vllm_available

        reason = vllm_available()  # before the model loads
        if reason is not None:
            raise BadInputError(reason)
    model = load_cli_model(model_name, memory_set, bridge=backend == "bridge")

    import dataclasses

    from meminject.generation import DecodeOptions, decode_options

    params = click.get_current_context().params
    # Per-token log-probabilities are for callers that read them (the Python API).
    names = {f.name for f in dataclasses.fields(DecodeOptions)} - {"stop_at_eos", "logprobs"}
    options = decode_options(**{name: params[name] for name in names}, stop_at_eos=not ignore_eos)
    if backend == "vllm":
        holder = [model]  # _run_vllm drops the last reference before vLLM loads its copy
        del model
        _run_vllm(
            holder,
            memory_set,
            prompt,
            requests,
            options,
            compare,
            as_json,
            output,
            chat,
            allow_outside_paths,
        )
        return
    common: dict[str, Any] = dict(chat=chat, use_kv_cache=not no_kv_cache, backend=backend)
    if requests is not None:
        _run_file(
            model, memory_set, requests, options, batch_size, output, allow_outside_paths, common
        )
    else:
        assert prompt is not None
        _run_one(model, memory_set, prompt, options, compare, as_json, allow_outside_paths, common)


def _check_names(requests: list[Any], memory_set: Any) -> None:
    known = {e.name for e in memory_set.entries} if memory_set is not None else set()
    for line in requests:
        for name in line.request.memories or ():
            if name not in known:
                what = (
                    f"the -m set has no memory '{name}'"
                    if known
                    else (f"names memory '{name}', but no memory set was given (-m)")
                )
                raise BadInputError(f"{line.where}: field 'memories': {what}")


def _run_one(
    model: Any,
    memory_set: Any,
    prompt: str,
    options: Any,
    compare: bool,
    as_json: bool,
    allow_outside_paths: bool,
    common: dict[str, Any],
) -> None:
    from meminject.engine import compile_memories
    from meminject.generation import generate_batch

    compiled = (
        compile_memories(model, memory_set, allow_outside_paths=allow_outside_paths)
        if memory_set is not None
        else None
    )
    baseline = injected = None
    if compiled and compare:
        # One batch: the baseline and the injected run side by side, each as if alone.
        baseline, injected = generate_batch(
            model, [prompt, prompt], memories_per_prompt=[None, compiled], options=options, **common
        )
    elif compiled:
        (injected,) = generate_batch(model, [prompt], compiled, options=options, **common)
    else:
        (baseline,) = generate_batch(model, [prompt], None, options=options, **common)
    names = [e.name for e in memory_set.entries if e.memory.enabled] if memory_set else []
    if as_json:
        payload = {
            "model": model.name,
            "coordinates": model.coordinates,
            "prompt": prompt,
            "memories": names,
            "baseline": baseline.to_dict() if baseline else None,
            "injected": injected.to_dict() if injected else None,
        }
        click.echo(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False))
        return
    _print_generation(prompt, names, baseline, injected, options.show_top)


def _run_file(
    model: Any,
    memory_set: Any,
    requests: list[Any],
    options: Any,
    batch_size: int,
    output: str | None,
    allow_outside_paths: bool,
    common: dict[str, Any],
) -> None:
    import dataclasses

    from meminject.engine import compile_memories
    from meminject.generation import generate_batch

    compiled_by_names: dict[tuple[str, ...] | None, Any] = {}
    per_prompt, per_options = [], []
    for line in requests:
        try:
            opt = dataclasses.replace(options, **line.request.overrides())
            opt.check(model.dims.d_vocab)  # here, so the error names the line
        except BadInputError as exc:
            raise BadInputError(f"{line.where}: {exc}") from None
        per_options.append(opt)
        names = line.request.memories
        key = tuple(sorted(names)) if names is not None else None
        if key not in compiled_by_names:
            if memory_set is None or key == ():
                compiled_by_names[key] = None
            else:
                chosen = memory_set if key is None else memory_set.subset(key)
                compiled_by_names[key] = compile_memories(
                    model, chosen, allow_outside_paths=allow_outside_paths
                )
        per_prompt.append(compiled_by_names[key])
    results = generate_batch(
        model,
        [line.request.prompt for line in requests],
        memories_per_prompt=per_prompt,
        options=per_options,
        batch_size=batch_size,
        **common,
    )
    _write_file_results(requests, results, memory_set, output)


def _write_file_results(
    requests: list[Any], results: list[Any], memory_set: Any, output: str | None
) -> None:
    all_names = [e.name for e in memory_set.entries if e.memory.enabled] if memory_set else []
    lines = []
    for line, result in zip(requests, results, strict=True):
        names = line.request.memories
        record: dict[str, Any] = {"id": line.request.id} if line.request.id is not None else {}
        record.update(
            prompt=result.prompt,
            completion=result.completion,
            memories=list(names) if names is not None else all_names,
            finish_reason=result.finish_reason,
            prompt_tokens=len(result.prompt_tokens),
            new_tokens=result.new_tokens,
            top_next=[
                {"token": t.token, "id": t.token_id, "prob": t.prob} for t in result.top_next
            ],
            backend=result.backend,
        )
        lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False))
    text = "".join(f"{line}\n" for line in lines)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from meminject.atomic import write_text_atomic

    write_text_atomic(Path(output), text, overwrite=True)
    click.echo(f"wrote {len(lines)} results to {output}", err=True)


def _run_vllm(
    holder: list[Any],
    memory_set: Any,
    prompt: str | None,
    requests: list[Any] | None,
    options: Any,
    compare: bool,
    as_json: bool,
    output: str | None,
    chat: bool,
    allow_outside_paths: bool,
) -> None:
    """Generation in vLLM (docs/vllm.md): every memory choice the run needs compiles on
    the meminject-loaded model first (refusals, one line per memory, exit 2, before vLLM
    starts), the model is released, then one engine runs them (the lines of --prompts in
    one batch, each request with its own choice)."""
    import dataclasses
    import gc
    import os

    from meminject.errors import EXIT_BAD_INPUT
    from meminject.vllm_backend import prepare, start_engine
    from meminject.vllm_backend.plan import MemoryPlan, NotRunnable, compile_plan

    # vLLM logs to stdout by default; keep stdout for results (JSON, JSONL).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model = holder.pop()
    tokens, source, dtype = prepare(model, memory_set)
    keys: list[tuple[str, ...] | None] = []
    per_options = []
    if requests is not None:
        for line in requests:
            try:
                opt = dataclasses.replace(options, **line.request.overrides())
                opt.check(model.dims.d_vocab)
            except BadInputError as exc:
                raise BadInputError(f"{line.where}: {exc}") from None
            per_options.append(opt)
            names = line.request.memories
            keys.append(tuple(sorted(names)) if names is not None else None)
    plans: dict[tuple[str, ...] | None, Any] = {}
    try:
        for key in [None, *keys]:
            if key in plans:
                continue
            if memory_set is None or key == ():
                plans[key] = MemoryPlan()
            else:
                chosen = memory_set if key is None else memory_set.subset(key)
                plans[key] = compile_plan(model, chosen, allow_outside_paths=allow_outside_paths)
    except NotRunnable as exc:
        for problem in exc.problems:  # one line per memory, before vLLM starts
            click.echo(f"Error: {problem}", err=True)
        click.get_current_context().exit(EXIT_BAD_INPUT)
    name, coordinates = model.name, model.coordinates
    del model
    gc.collect()
    engine = start_engine(tokens, source, dtype)
    try:
        if requests is not None:
            # One batch: each line's request runs its own memory choice in shared steps.
            results = engine.generate(
                [line.request.prompt for line in requests],
                per_options,
                chat=chat,
                memories=[plans[key] for key in keys],
            )
            _write_file_results(requests, results, memory_set, output)
            return
        assert prompt is not None
        plan = plans[None]
        baseline = injected = None
        if plan and compare:  # one batch, as the other backends run it
            baseline, injected = engine.generate(
                [prompt, prompt], options, chat=chat, memories=[None, plan]
            )
        elif plan:
            (injected,) = engine.generate([prompt], options, chat=chat, memories=[plan])
        else:
            (baseline,) = engine.generate([prompt], options, chat=chat)
    finally:
        engine.close()
    names = [e.name for e in memory_set.entries if e.memory.enabled] if memory_set else []
    if as_json:
        payload = {
            "model": name,
            "coordinates": coordinates,
            "prompt": prompt,
            "memories": names,
            "baseline": baseline.to_dict() if baseline else None,
            "injected": injected.to_dict() if injected else None,
        }
        click.echo(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False))
        return
    _print_generation(prompt, names, baseline, injected, options.show_top)


def _print_generation(
    prompt: str, names: list[str], baseline: Any, injected: Any, show_top: int
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    if names:
        console.print(f"[bold]memories[/]: {', '.join(names)}")
    runs = [(label, g) for label, g in (("baseline", baseline), ("injected", injected)) if g]
    table = Table(show_header=True, header_style="bold", show_lines=False)
    table.add_column("")
    for label, _ in runs:
        table.add_column(label, overflow="fold")
    table.add_row(
        "completion",
        *[f"[dim]{escape(prompt)}[/][bold]{escape(g.completion)}[/]" for _, g in runs],
    )
    for i in range(show_top):
        cells = []
        for _, g in runs:
            if i < len(g.top_next):
                t = g.top_next[i]
                cells.append(
                    f"{t.token!r}  {t.prob:.4f}" if t.prob >= 1e-3 else f"{t.token!r}  {t.prob:.2e}"
                )
            else:
                cells.append("")
        table.add_row(f"next #{i + 1}", *cells)
    console.print(table)
