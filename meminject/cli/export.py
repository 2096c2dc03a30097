"""The ``meminject export`` command: memories in another tool's format (today llama.cpp
control vectors, :mod:`meminject.export_llama_cpp`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from meminject.cli.options import load_cli_model, model_option, output_option, outside_paths_option


@click.command()
@click.argument("memory_paths", nargs=-1, required=True, type=click.Path(), metavar="MEMORIES...")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["llama-cpp"]),
    default="llama-cpp",
    show_default=True,
    help="llama-cpp: a control-vector GGUF (add memories at resid_post, positions all).",
)
@output_option("The file to write (.gguf).", required=True, old_names=("--out",))
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
    """Write MEMORIES as a llama.cpp control vector: one direction per block, τ baked in
    (run llama.cpp with --control-vector FILE, or --control-vector-scaled FILE:S)."""
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
