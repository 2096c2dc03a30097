"""The ``meminject inspect`` command: the logit lens over a prompt, per layer (and per
head with ``--heads``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from meminject.cli.options import (
    CONTINUATION_RULE,
    file_out_option,
    heads_option,
    json_option,
    load_cli_model,
    model_option,
)


@click.command()
@click.argument("prompt")
@model_option("toyworld")
@heads_option("Also project these heads' results (SPEC: 0-3, 0,5 or all; --heads alone: all).")
@click.option("--layers", "layer_spec", default="all", show_default=True, help="Layers: 0-11 …")
@click.option(
    "--show-top",
    "show_top",
    default=5,
    show_default=True,
    type=click.IntRange(0),
    help="How many most likely tokens to show per projection.",
)
@click.option(
    "--token",
    default=None,
    help=f"Rank this token in every projection (one token). {CONTINUATION_RULE}",
)
@file_out_option("--plot", help="Heatmap of --token's rank, layers × heads (PNG).")
@click.option("--force", is_flag=True, help="Overwrite the --plot file.")
@json_option()
def inspect(
    prompt: str,
    model_name: str,
    head_spec: str | None,
    layer_spec: str,
    show_top: int,
    token: str | None,
    plot: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Show what each layer's attention (and with --heads each head) writes at PROMPT's
    last position, projected onto the vocabulary through W_U (the paper's head latent
    space projector)."""
    from meminject.errors import BadInputError
    from meminject.lens import plot_ranks, project_attention
    from meminject.specs import parse_int_spec

    if plot is not None and token is None:
        raise click.UsageError("--plot draws the rank of --token; give --token too")
    if plot is not None and plot.exists() and not force:
        raise BadInputError(f"{plot} exists; pass --force to overwrite it")
    model = load_cli_model(model_name, None, bridge=True)
    layers = parse_int_spec(layer_spec, "layer", universe=range(model.dims.n_layers))
    heads = (
        parse_int_spec(head_spec, "head", universe=range(model.dims.n_heads))
        if head_spec is not None
        else None
    )
    n_heads = model.dims.n_heads
    for head in heads or ():
        if not 0 <= head < n_heads:
            raise BadInputError(
                f"head {head} is out of range; the model has {n_heads} heads (0-{n_heads - 1})"
            )
    report = project_attention(
        model, prompt, layers=layers, heads=heads is not None, top_k=show_top, token=token
    )
    if heads is not None and len(heads) < model.dims.n_heads:
        import dataclasses

        chosen = set(heads)
        report = dataclasses.replace(
            report,
            projections=[p for p in report.projections if p.head is None or p.head in chosen],
        )
    if plot is not None:
        plot_ranks(report, plot, force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, allow_nan=False))
        return
    _print_lens(report, plot)


def _print_lens(report: Any, plot: Path | None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"last position {report.position} ({report.last_token!r}); projections x·W_U "
        "(no final norm)"
    )
    table = Table(show_header=True, header_style="bold")
    table.add_column("layer", justify="right")
    table.add_column("head", justify="right")
    table.add_column("top tokens (logit)")
    if report.token is not None:
        table.add_column(f"rank of {report.token!r}", justify="right")
    for p in report.projections:
        tokens = "  ".join(f"{escape(repr(t.token))} {t.logit:.2f}" for t in p.top)
        row = [str(p.layer), "attn" if p.head is None else str(p.head), tokens]
        if report.token is not None:
            row.append(str(p.rank))
        table.add_row(*row)
    console.print(table)
    if plot is not None:
        console.print(f"heatmap: {plot}")
