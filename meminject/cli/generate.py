"""The ``meminject generate`` command (click): one prompt, or a JSONL file of them in
batches, with a memory set (or, per line, some of its memories) injected.

Like every command it imports torch only inside its body. The decoding options are
``transformers``' names: ``--top-k``/``--top-p`` filter sampling, and ``--show-top``
is how many most likely next tokens to print (it was ``--top-k`` before sampling
filters existed; the two now coexist).

Output: the completion as plain text (terminal or pipe alike); a table when asked to
compare or to show top tokens; with ``--json`` and ``--prompts``, one JSON object per
generation per line, :class:`meminject.schema.GenerationRecord` everywhere.
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
    json_option,
    load_cli_model,
    memories_option,
    model_option,
    number_option,
    output_option,
    outside_paths_option,
)
from meminject.errors import BadInputError

#: --show-top when a table or JSON is printed and the option is not given.
SHOW_TOP = 5


@click.command()
@click.argument("prompt", required=False)
@memories_option("Memory file or directory (repeatable).")
@file_in_option(
    "--prompts",
    "prompts_file",
    help='A JSONL file, one request a line: {"prompt": …, "memories": [names], '
    "options…}; prints one JSON result a line (instead of PROMPT).",
)
@output_option("With --prompts: write the JSONL results here (atomically) instead of stdout.")
@number_option(
    "--batch-size", 8, click.IntRange(1, 4096), "Prompts per forward pass with --prompts."
)
@model_option("files")
@click.option(
    "--max-new-tokens",
    default=20,
    show_default=True,
    type=click.IntRange(0, 4096),
    help="How many tokens to generate at most.",
)
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
@click.option(
    "--show-top",
    default=None,
    type=click.IntRange(0),
    help=f"Show the N most likely next tokens in a table (JSON: default {SHOW_TOP}).",
)
@click.option(
    "--compare",
    is_flag=True,
    help="Also run without the memories: a table of both (with --json or --prompts, a "
    "baseline record before each injected one).",
)
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
@json_option(
    "Print one JSON object per generation per line (the schema: meminject schema --generation)."
)
@outside_paths_option
def generate(
    prompt: str | None,
    memory_paths: Sequence[str],
    prompts_file: str | None,
    output: Path | None,
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
    show_top: int | None,
    compare: bool,
    no_kv_cache: bool,
    backend: str,
    as_json: bool,
    allow_outside_paths: bool,
) -> None:
    """Generate a completion of PROMPT (- reads it from standard input; or of every line
    of --prompts) with a memory set injected.

    Prints the completion as plain text; a table with --compare or --show-top; one JSON
    object per generation per line with --json (always with --prompts)."""
    from meminject.loading import load_memories

    if (prompt is None) == (prompts_file is None):
        raise BadInputError("give a PROMPT or --prompts FILE.jsonl (one of them)")
    if prompt == "-":
        prompt = _read_stdin()
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

    params = dict(click.get_current_context().params)
    table = compare or show_top is not None
    params["show_top"] = SHOW_TOP if show_top is None else show_top
    # Per-token log-probabilities are for callers that read them (the Python API).
    names = {f.name for f in dataclasses.fields(DecodeOptions)} - {"stop_at_eos", "logprobs"}
    options = decode_options(**{name: params[name] for name in names}, stop_at_eos=not ignore_eos)
    shown = "json" if as_json else "table" if table else "text"
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
            shown,
            output,
            chat,
            allow_outside_paths,
        )
        return
    common: dict[str, Any] = dict(chat=chat, use_kv_cache=not no_kv_cache, backend=backend)
    if requests is not None:
        _run_file(
            model,
            memory_set,
            requests,
            options,
            batch_size,
            output,
            compare,
            allow_outside_paths,
            common,
        )
    else:
        assert prompt is not None
        _run_one(model, memory_set, prompt, options, compare, shown, allow_outside_paths, common)


def _read_stdin() -> str:
    """The prompt from standard input (``generate -``), one trailing newline removed, as
    a shell's ``$(…)`` would."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise BadInputError(f"standard input is not UTF-8 text: {exc.reason}") from None
    text = text[:-1] if text.endswith("\n") else text
    if text.endswith("\r"):
        text = text[:-1]
    if not text:
        raise BadInputError("PROMPT is - but standard input was empty")
    return text


def record(
    model: Any,
    prompt: str,
    result: Any,
    memories: list[str],
    request_id: str | int | None = None,
) -> str:
    """One generation as one JSON line (:class:`meminject.schema.GenerationRecord`)."""
    from meminject.schema import GenerationRecord, NextToken

    line = GenerationRecord(
        id=request_id,
        model=model.name,
        prompt=prompt,
        memories=memories,
        completion=result.completion,
        finish_reason=result.finish_reason,
        prompt_tokens=list(result.prompt_tokens),
        new_tokens=list(result.new_tokens),
        top_next=[
            NextToken(token=t.token, token_id=t.token_id, prob=t.prob) for t in result.top_next
        ],
        backend=result.backend,
    )
    return json.dumps(line.model_dump(mode="json"), ensure_ascii=False, allow_nan=False)


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
    shown: str,
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
    _show_one(model, memory_set, prompt, baseline, injected, shown, options.show_top)


def _show_one(
    model: Any,
    memory_set: Any,
    prompt: str,
    baseline: Any,
    injected: Any,
    shown: str,
    show_top: int,
) -> None:
    names = [e.name for e in memory_set.entries if e.memory.enabled] if memory_set else []
    if shown == "json":
        for result, used in ((baseline, []), (injected, names)):
            if result is not None:
                click.echo(record(model, prompt, result, used))
    elif shown == "table":
        _print_generation(prompt, names, baseline, injected, show_top)
    else:
        shown_run = injected if injected is not None else baseline
        assert shown_run is not None
        click.echo(shown_run.completion)


def _run_file(
    model: Any,
    memory_set: Any,
    requests: list[Any],
    options: Any,
    batch_size: int,
    output: Path | None,
    compare: bool,
    allow_outside_paths: bool,
    common: dict[str, Any],
) -> None:

    from meminject.engine import compile_memories
    from meminject.generation import generate_batch

    compiled_by_names: dict[tuple[str, ...] | None, Any] = {}
    prompts: list[str] = []
    per_prompt: list[Any] = []
    per_options: list[Any] = []
    runs: list[tuple[Any, list[str]]] = []
    all_names = [e.name for e in memory_set.entries if e.memory.enabled] if memory_set else []
    for line in requests:
        opt = _line_options(line, options, model.dims.d_vocab)
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
        used = list(names) if names is not None else all_names
        if compare and compiled_by_names[key] is not None:
            # The baseline first, as for one prompt; both rows go through one batch run.
            prompts.append(line.request.prompt)
            per_prompt.append(None)
            per_options.append(opt)
            runs.append((line, []))
        prompts.append(line.request.prompt)
        per_prompt.append(compiled_by_names[key])
        per_options.append(opt)
        runs.append((line, used if compiled_by_names[key] is not None else []))
    results = generate_batch(
        model,
        prompts,
        memories_per_prompt=per_prompt,
        options=per_options,
        batch_size=batch_size,
        **common,
    )
    _write_records(model, runs, results, output)


def _write_records(
    model: Any, runs: list[tuple[Any, list[str]]], results: list[Any], output: Path | None
) -> None:
    lines = [
        record(model, line.request.prompt, result, used, line.request.id)
        for (line, used), result in zip(runs, results, strict=True)
    ]
    text = "".join(f"{line}\n" for line in lines)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from meminject.atomic import write_text_atomic

    write_text_atomic(output, text, overwrite=True)
    click.echo(f"wrote {len(lines)} results to {output}", err=True)


def _run_vllm(
    holder: list[Any],
    memory_set: Any,
    prompt: str | None,
    requests: list[Any] | None,
    options: Any,
    compare: bool,
    shown: str,
    output: Path | None,
    chat: bool,
    allow_outside_paths: bool,
) -> None:
    """Generation in vLLM (docs/vllm.md), with the rows and output of the other backends:
    every memory choice the run needs compiles on the meminject-loaded model first
    (refusals, one line per memory, exit 2, before vLLM starts), the model is released,
    then one engine runs every row in one batch, each request with its own choice."""
    import gc
    import os
    from types import SimpleNamespace

    from meminject.errors import EXIT_BAD_INPUT
    from meminject.vllm_backend import prepare, start_engine
    from meminject.vllm_backend.plan import MemoryPlan, NotRunnable, compile_plan

    # vLLM logs to stdout by default; keep stdout for results.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model = holder.pop()
    tokens, source, dtype = prepare(model, memory_set)
    plans: dict[tuple[str, ...] | None, Any] = {}

    def plan_for(model: Any, key: tuple[str, ...] | None) -> Any:
        if key not in plans:
            if memory_set is None or key == ():
                plans[key] = MemoryPlan()
            else:
                chosen = memory_set if key is None else memory_set.subset(key)
                plans[key] = compile_plan(model, chosen, allow_outside_paths=allow_outside_paths)
        return plans[key]

    prompts: list[str] = []
    per_plan: list[Any] = []
    per_options: list[Any] = []
    runs: list[tuple[Any, list[str]]] = []
    all_names = [e.name for e in memory_set.entries if e.memory.enabled] if memory_set else []
    try:
        if requests is not None:
            for line in requests:
                opt = _line_options(line, options, model.dims.d_vocab)
                names = line.request.memories
                plan = plan_for(model, tuple(sorted(names)) if names is not None else None)
                used = list(names) if names is not None else all_names
                if compare and plan:  # the baseline first, as the other backends do
                    prompts.append(line.request.prompt)
                    per_plan.append(None)
                    per_options.append(opt)
                    runs.append((line, []))
                prompts.append(line.request.prompt)
                per_plan.append(plan)
                per_options.append(opt)
                runs.append((line, used if plan else []))
        else:
            assert prompt is not None
            plan = plan_for(model, None)
            if not plan or compare:
                prompts.append(prompt)
                per_plan.append(None)
            if plan:
                prompts.append(prompt)
                per_plan.append(plan)
            per_options = [options] * len(prompts)
    except NotRunnable as exc:
        for problem in exc.problems:  # one line per memory, before vLLM starts
            click.echo(f"Error: {problem}", err=True)
        click.get_current_context().exit(EXIT_BAD_INPUT)
    named = SimpleNamespace(name=model.name)  # what the records need of the model
    del model
    gc.collect()
    engine = start_engine(tokens, source, dtype)
    try:
        results = engine.generate(prompts, per_options, chat=chat, memories=per_plan)
    finally:
        engine.close()
    if requests is not None:
        _write_records(named, runs, results, output)
        return
    assert prompt is not None
    baseline = results[0] if per_plan[0] is None else None
    injected = results[-1] if per_plan[-1] is not None else None
    _show_one(named, memory_set, prompt, baseline, injected, shown, options.show_top)


def _print_generation(
    prompt: str, names: list[str], baseline: Any, injected: Any, show_top: int
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]prompt[/]: {escape(prompt)}")
    if names:
        console.print(f"[bold]memories[/]: {', '.join(names)}")
    runs = [(label, g) for label, g in (("baseline", baseline), ("injected", injected)) if g]
    table = Table(show_header=True, header_style="bold", show_lines=False)
    table.add_column("")
    for label, _ in runs:
        table.add_column(label, overflow="fold")
    table.add_row("completion", *[f"[bold]{escape(repr(g.completion))}[/]" for _, g in runs])
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


def _line_options(line: Any, options: Any, d_vocab: int) -> Any:
    """A prompt file line's decoding options (the command's, with the line's overrides),
    checked here so that an error names the line."""
    import dataclasses

    try:
        opt = dataclasses.replace(options, **line.request.overrides())
        opt.check(d_vocab)
    except BadInputError as exc:
        raise BadInputError(f"{line.where}: {exc}") from None
    return opt
