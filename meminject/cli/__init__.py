"""The ``meminject`` command line (click), one module per command (or family of
listing commands); this module holds the group, the error handling every command
shares, and the entry point that adds plugins' commands.

Light commands (``--help``, ``validate`` without ``--model``, ``plugins``,
``schema``…) must not import torch or transformer_lens, so every heavy import
happens inside a command body. Errors a user can cause print one line and exit
with 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from meminject.cli import (
    evaluate,
    export,
    generate,
    inspect,
    learn,
    listings,
    serve,
    sweep,
    validate,
)
from meminject.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, MeminjectError, one_line

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
        except click.BadParameter as exc:
            # A value out of range (--seed -1) is bad input like any other: one line,
            # exit 2, not click's usage block (unknown options still get the block).
            if _debug(ctx):
                raise
            click.echo(f"Error: {one_line(exc.format_message())}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
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
@click.option(
    "--no-plugins", is_flag=True, help="Load built-ins only (as MEMINJECT_LOAD_PLUGINS='')."
)
@click.pass_context
def cli(ctx: click.Context, debug: bool, no_plugins: bool) -> None:
    """Give a language model memories at inference time.

    Memories are small TOML files: texts injected into attention outputs
    (Sakarvadia et al., 2023) or gradient-derived local memories.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    from meminject import progress

    progress.enable(True)  # off with a command's --quiet


# The package's attributes stay the command modules (meminject.cli.learn is the module,
# so tests and plugins can reach its names); the group gets each module's command.
for _command in (
    generate.generate,
    learn.learn,
    validate.validate,
    evaluate.evaluate,
    export.export,
    sweep.sweep,
    serve.serve,
    inspect.inspect,
    listings.plugins,
    listings.encoders,
    listings.datasets,
    listings.strategies,
    listings.backends,
    listings.models,
    validate.schema,
):
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: adds plugins' commands, then runs the group."""
    args = list(argv) if argv is not None else sys.argv[1:]
    options = args[: args.index("--")] if "--" in args else args
    if "--no-plugins" in options:
        # Plugins are loaded before click parses (their commands join the group), so the
        # flag is honoured here, through the same switch as the environment variable.
        from meminject.plugins import ENV_VAR, reset_registry

        os.environ[ENV_VAR] = ""
        reset_registry()
    try:
        import warnings

        from meminject.plugins import PluginWarning, get_registry

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)  # shown once, below, as one line
            registry = get_registry()
        for message in registry.warnings:
            click.echo(f"Warning: {message}", err=True)
        registry.add_commands(cli)
    except MeminjectError as exc:
        if "--debug" in options:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    cli.main(args=_global_flags_first(args), prog_name="meminject")


#: Flags of the group that users also put after the command name.
_GLOBAL_FLAGS = ("--debug", "--no-plugins")


def _global_flags_first(args: list[str]) -> list[str]:
    """``meminject generate … --debug`` means ``meminject --debug generate …``: move the
    group's flags in front (before ``--`` only, where they cannot be a prompt)."""
    cut = args.index("--") if "--" in args else len(args)
    head, tail = args[:cut], args[cut:]
    moved = [a for a in head if a in _GLOBAL_FLAGS]
    return [*dict.fromkeys(moved), *(a for a in head if a not in _GLOBAL_FLAGS), *tail]


if __name__ == "__main__":  # pragma: no cover
    main()
