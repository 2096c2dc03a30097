"""The ``meminject export`` command: memories in another tool's format (today llama.cpp
control vectors, :mod:`meminject.export_llama_cpp`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from meminject.cli.options import load_cli_model, model_option, output_option, outside_paths_option


@click.command()
@click.argument("memory_paths", nargs=-1, required=True, type=click.Path(), metavar="MEMORIES...")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["llama-cpp", "vllm"]),
    default="llama-cpp",
    show_default=True,
    help="llama-cpp: a control-vector GGUF (add memories at resid_post, positions all); "
    "vllm: a memory plan for vllm serve (NAME.safetensors; docs/vllm.md).",
)
@output_option(
    "The file to write (.gguf, or .safetensors for vllm).", required=True, old_names=("--out",)
)
@click.option("--force", is_flag=True, help="Overwrite the --output file.")
@model_option("files")
@outside_paths_option
def export(
    memory_paths: Sequence[str],
    export_format: str,
    output: Path,
    force: bool,
    model_name: str | None,
    allow_outside_paths: bool,
) -> None:
    """Write MEMORIES as a llama.cpp control vector (one direction per block, τ baked in;
    run llama.cpp with --control-vector FILE, or --control-vector-scaled FILE:S), or as a
    memory plan that vLLM's own server loads (--format vllm; docs/vllm.md)."""
    from meminject.errors import EXIT_BAD_INPUT, BadInputError
    from meminject.export_llama_cpp import (
        NotExpressible,
        directions,
        model_hint,
        write_control_vector,
    )
    from meminject.loading import load_memories

    if output.exists() and not force:
        raise BadInputError(f"{output} exists; pass --force to overwrite it")
    memory_set = load_memories(memory_paths)
    if export_format == "vllm":
        _export_vllm(memory_set, output, force, model_name, allow_outside_paths)
        return
    model = load_cli_model(model_name, memory_set)
    try:
        vectors = directions(model, memory_set, allow_outside_paths=allow_outside_paths)
    except NotExpressible as exc:
        for problem in exc.problems:  # one line per memory, nothing written
            click.echo(f"Error: {problem}", err=True)
        click.get_current_context().exit(EXIT_BAD_INPUT)
    write_control_vector(output, vectors, hint=model_hint(model), overwrite=force)
    plural = "s" * (len(vectors) != 1)
    blocks = ", ".join(str(b) for b in vectors)
    click.echo(
        f"wrote {len(vectors)} direction{plural} (block{plural} {blocks}) for {model.name} "
        f"to {output}; τ is baked in"
    )


def _export_vllm(
    memory_set: Any, output: Path, force: bool, model_name: str | None, allow_outside_paths: bool
) -> None:
    """The memory set compiled into one plan file, named by the file's stem."""
    import json

    from meminject.dtypes import dtype_name
    from meminject.errors import EXIT_BAD_INPUT, BadInputError
    from meminject.vllm_backend import prepare
    from meminject.vllm_backend.plan import (
        CHOICE,
        PLAN_NAME,
        PLANS_ENV,
        WORKER,
        NotRunnable,
        compile_plan,
    )

    name = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else ""
    if not PLAN_NAME.fullmatch(name):
        raise BadInputError(
            f"{output}: a vllm plan is written to NAME.safetensors, NAME being what requests "
            "send (letters, digits, '_', '.', '-'; at most 64)"
        )
    model = load_cli_model(model_name, memory_set)
    prepare(model, memory_set)  # a local Llama-family checkpoint, as vLLM will load
    try:
        plan = compile_plan(model, memory_set, allow_outside_paths=allow_outside_paths)
    except NotRunnable as exc:
        for problem in exc.problems:  # one line per memory, nothing written
            click.echo(f"Error: {problem}", err=True)
        click.get_current_context().exit(EXIT_BAD_INPUT)
    digest = plan.save(
        output,
        model=model.name,
        d_model=model.dims.d_model,
        n_layers=model.dims.n_layers,
        overwrite=force,
    )
    fields = json.dumps({"vllm_xargs": {"meminject": name}, "cache_salt": digest})
    changes = f"{len(plan.hooks)} change" + "s" * (len(plan.hooks) != 1)
    click.echo(f"wrote plan '{name}' ({changes}) for {model.name} to {output}")
    click.echo(f"requests choose it with: {fields}")
    click.echo(
        f"serve: {PLANS_ENV}={output.parent} vllm serve {model.source} --dtype "
        f"{dtype_name(model.dtype)} --enforce-eager --worker-cls {WORKER} "
        f"--logits-processors {CHOICE}"
    )
