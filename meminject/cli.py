"""The ``meminject`` command line (click).

Light commands (``--help``, ``validate`` without ``--model``, ``plugins``,
``schema``…) must not import torch or transformer_lens, so every heavy import
happens inside a command body. Errors a user can cause print one line and exit
with 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from meminject.errors import EXIT_RUNTIME, MeminjectError

_DEBUG_ENV = "MEMINJECT_DEBUG"


class _Group(click.Group):
    """Turns meminject errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeminjectError as exc:
            if _debug(ctx):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if _debug(ctx):
                raise
            click.echo(
                f"Error: unexpected {type(exc).__name__}: {exc} (run with --debug for the "
                "traceback)",
                err=True,
            )
            ctx.exit(EXIT_RUNTIME)


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool((root.obj or {}).get("debug"))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meminject")
@click.option("--debug", is_flag=True, envvar=_DEBUG_ENV, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Give a language model memories at inference time.

    Memories are small TOML files: texts injected into attention outputs
    (Sakarvadia et al., 2023) or gradient-derived local memories.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _model_options(f: Any) -> Any:
    f = click.option(
        "--coordinates",
        type=click.Choice(["processed", "raw"]),
        default=None,
        help="Weight coordinates (default: the memory files' [model], else processed).",
    )(f)
    f = click.option(
        "--dtype",
        type=click.Choice(["float32", "float16", "bfloat16"]),
        default=None,
        help="Model dtype (default float32).",
    )(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: auto).")(f)
    return f


def _load(
    model_name: str | None,
    memory_set: Any,
    device: str | None,
    dtype: str | None,
    coordinates: str | None,
) -> Any:
    from meminject.models import load_model

    info = memory_set.model_info() if memory_set is not None else None
    name = model_name or (info.name if info and info.name else None) or "toyworld"
    coords = coordinates or (info.coordinates if info and info.coordinates else "processed")
    return load_model(name, device=device, dtype=dtype, coordinates=coords)


@cli.command()
@click.argument("prompt")
@click.option(
    "-m",
    "--memories",
    "memory_paths",
    multiple=True,
    type=click.Path(),
    help="Memory file or directory (repeatable).",
)
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model name, alias or local directory (default: the files' [model], else toyworld).",
)
@_model_options
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(0, 4096))
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="0 is greedy decoding.",
)
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option(
    "--top-k",
    default=5,
    show_default=True,
    type=click.IntRange(0),
    help="How many most likely next tokens to show.",
)
@click.option("--compare", is_flag=True, help="Show the baseline beside the injected run.")
@click.option("--no-kv-cache", is_flag=True, help="Recompute the whole sequence each step.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def generate(
    prompt: str,
    memory_paths: Sequence[str],
    model_name: str | None,
    device: str | None,
    dtype: str | None,
    coordinates: str | None,
    max_new_tokens: int,
    temperature: float,
    seed: int | None,
    top_k: int,
    compare: bool,
    no_kv_cache: bool,
    as_json: bool,
) -> None:
    """Generate a completion of PROMPT with a memory set injected."""
    from meminject.memfile import load_memory_set

    memory_set = load_memory_set(memory_paths) if memory_paths else None
    model = _load(model_name, memory_set, device, dtype, coordinates)

    from meminject.engine import compile_memories
    from meminject.generation import generate as run

    compiled = compile_memories(model, memory_set) if memory_set is not None else None
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        use_kv_cache=not no_kv_cache,
        top_k=top_k,
    )
    baseline = run(model, prompt, None, seed=seed, **kwargs) if compare or not compiled else None
    injected = run(model, prompt, compiled, seed=seed, **kwargs) if compiled else None
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
        click.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    _print_generation(prompt, names, baseline, injected, top_k)


def _print_generation(
    prompt: str, names: list[str], baseline: Any, injected: Any, top_k: int
) -> None:
    from rich.console import Console
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
        *[f"[dim]{_escape(prompt)}[/][bold]{_escape(g.completion)}[/]" for _, g in runs],
    )
    for i in range(top_k):
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


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Also check ranges and widths against this model (loads it).",
)
@_model_options
def validate(
    paths: Sequence[str],
    model_name: str | None,
    device: str | None,
    dtype: str | None,
    coordinates: str | None,
) -> None:
    """Check memory files and directories (schema only unless --model is given)."""
    from meminject.memfile import load_memory_set

    memory_set = load_memory_set(paths)
    checked = "schema"
    if model_name is not None:
        from meminject.engine import compile_memories

        model = _load(model_name, memory_set, device, dtype, coordinates)
        compile_memories(model, memory_set)
        checked = f"schema and model '{model.name}'"
    n_files = len(memory_set.files)
    click.echo(
        f"ok: {len(memory_set)} memor{'y' if len(memory_set) == 1 else 'ies'} in {n_files} "
        f"file{'s' * (n_files != 1)} ({checked})"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List loaded plugins and the hooks they implement."""
    from meminject.plugins import get_registry

    registry = get_registry()
    rows = [
        {"name": p.name, "hooks": list(p.hooks), "version": p.version, "builtin": p.builtin}
        for p in registry.plugins
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for p in registry.plugins:
        tag = "built-in" if p.builtin else f"version {p.version}"
        click.echo(f"{p.name} ({tag}): {', '.join(p.hooks) or 'no hooks'}")


def _listing(kind: str, entries: dict[str, Any], describe: Any) -> None:
    for name, entry in entries.items():
        click.echo(f"{name}  [{entry.plugin}]  {describe(entry)}")


def _first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


@cli.command()
def encoders() -> None:
    """List registered encoders."""
    from meminject.plugins import get_registry

    _listing("encoder", get_registry().encoders, lambda e: _first_line(e.encoder))


@cli.command()
def strategies() -> None:
    """List registered injection strategies."""
    from meminject.plugins import get_registry

    _listing("strategy", get_registry().strategies, lambda e: _first_line(e.strategy_cls))


@cli.command()
def models() -> None:
    """List registered model sources (any local Hugging Face directory or hub name works too)."""
    from meminject.plugins import get_registry

    _listing("model", get_registry().models, lambda e: e.description)


@cli.command()
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file instead of standard output.",
)
def schema(out: Path | None) -> None:
    """Print the JSON Schema of memory files, including plugins' parameters."""
    from meminject.plugins import get_registry
    from meminject.schema import json_schema

    text = json.dumps(json_schema(get_registry().file_model), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        from meminject.atomic import write_text_atomic

        write_text_atomic(out, text, overwrite=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: adds plugins' commands, then runs the group."""
    try:
        from meminject.plugins import get_registry

        get_registry().add_commands(cli)
    except MeminjectError as exc:
        if "--debug" in (argv if argv is not None else sys.argv):
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    cli.main(args=list(argv) if argv is not None else None, prog_name="meminject")


if __name__ == "__main__":  # pragma: no cover
    main()
