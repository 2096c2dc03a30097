"""``meminject validate`` (memory files against the schema, and a model when asked) and
``meminject schema`` (the JSON Schema of the format): both light unless a model loads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click

from meminject.cli.options import (
    load_cli_model,
    model_option,
    output_option,
    outside_paths_option,
)


@click.command()
# Plain strings, not click.Path: click stats a Path argument itself and lets a NUL byte's
# ValueError escape; the loader reports every bad name as a one-line error instead.
@click.argument("paths", nargs=-1, required=True, type=str, metavar="PATHS...")
@click.option(
    "--all-problems",
    is_flag=True,
    help="List every schema problem of every file, one line each, instead of the first "
    "(checks against --model still stop at the first).",
)
@model_option("optional")
@outside_paths_option
def validate(
    paths: Sequence[str],
    model_name: str | None,
    all_problems: bool,
    allow_outside_paths: bool,
) -> None:
    """Check memory files and directories (schema only unless --model is given)."""
    from meminject.errors import EXIT_BAD_INPUT
    from meminject.loading import load_memories
    from meminject.memfile import memory_set_problems
    from meminject.plugins import get_registry

    if all_problems:
        problems = memory_set_problems(paths, get_registry())
        if problems:
            for problem in problems:
                click.echo(f"Error: {problem}", err=True)
            click.get_current_context().exit(EXIT_BAD_INPUT)
    memory_set = load_memories(paths)
    checked = "schema"
    if model_name is not None:
        from meminject.engine import compile_memories

        model = load_cli_model(model_name, memory_set)
        compile_memories(model, memory_set, allow_outside_paths=allow_outside_paths)
        checked = f"schema and model '{model.name}'"
    n_files = len(memory_set.files)
    click.echo(
        f"ok: {len(memory_set)} memor{'y' if len(memory_set) == 1 else 'ies'} in {n_files} "
        f"file{'s' * (n_files != 1)} ({checked})"
    )


@click.command()
@output_option("Write to this file instead of standard output.", old_names=("--out",))
@click.option(
    "--generation",
    is_flag=True,
    help="The schema of one line of generate --json / --prompts output instead.",
)
def schema(output: Path | None, generation: bool) -> None:
    """Print the JSON Schema of memory files, including plugins' parameters (or, with
    --generation, of generate's JSON output)."""
    from meminject.schema import generation_json_schema, json_schema

    if generation:
        found = generation_json_schema()
    else:
        from meminject.plugins import get_registry

        found = json_schema(get_registry().file_model)
    text = json.dumps(found, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        from meminject.atomic import write_text_atomic

        write_text_atomic(output, text, overwrite=True)
