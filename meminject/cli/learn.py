"""The ``meminject learn`` command: a local (gated) memory fitted from one prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from meminject.cli.options import (
    CONTINUATION_RULE,
    file_in_option,
    load_cli_model,
    model_option,
    number_option,
    output_option,
)
from meminject.sites import LAYER_SITES


@click.command()
@click.argument("prompt")
@click.option(
    "--target",
    required=True,
    help=f"What the prompt should continue with. {CONTINUATION_RULE}",
)
@click.option("--layer", required=True, type=click.IntRange(0), help="Layer ℓ of the site.")
@click.option(
    "--site",
    required=True,
    type=click.Choice(LAYER_SITES),
)
@number_option("--position", -1, int, "Prompt position of the key (negative counts from the end).")
# Numbers are checked by meminject.learn (finite and above 0), not by click.FloatRange,
# which lets inf and nan through, so that a bad value is one "Error:" line like any other.
@click.option(
    "--alpha",
    default=None,
    type=float,
    help="Step size (finite, > 0); default: the smallest that makes the target top-1.",
)
@click.option(
    "--steps",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Gradient steps of size alpha. Left at 1 and with no --alpha, 2 and then 3 steps "
    "are tried when no step size works with one.",
)
@click.option("--teacher-force", is_flag=True, help="Fit all target tokens, not only the first.")
@file_in_option(
    "--positive", "positive_file", help="Prompts (one per line) that must produce the target."
)
@file_in_option(
    "--negative", "negative_file", help="Prompts (one per line) that must not produce the target."
)
@click.option(
    "--hardness", default=3.0, show_default=True, type=float, help="Gate hardness (finite, > 0)."
)
@click.option(
    "--boundary",
    default=None,
    type=float,
    help="Use this boundary (finite, > 0) instead of searching (default 0.25 without examples).",
)
@click.option("--grid", default=None, help="Boundaries to search, e.g. 0.05-2:0.05.")
@click.option("--name", default=None, help="Memory name (default: from the target).")
@output_option(
    "TOML file to write (tensors go beside it).",
    required=True,
    old_names=("--out",),
    checked_by_command=True,
)
@click.option("--append", is_flag=True, help="Add the memory to an existing file.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@model_option("toyworld")
@click.pass_context
def learn(
    ctx: click.Context,
    prompt: str,
    target: str,
    layer: int,
    site: str,
    position: int,
    alpha: float | None,
    steps: int,
    teacher_force: bool,
    positive_file: str | None,
    negative_file: str | None,
    hardness: float,
    boundary: float | None,
    grid: str | None,
    name: str | None,
    output: Path,
    append: bool,
    force: bool,
    model_name: str,
) -> None:
    """Learn a gated local memory that makes PROMPT continue with --target.

    Every argument is checked before the model loads, and nothing is written unless
    the whole memory (tensors and TOML) is good: a failure leaves the files as they were.
    """
    from click.core import ParameterSource

    from meminject import learn as learning
    from meminject.specs import parse_float_spec

    # 1. Everything that needs no model, before the model loads.
    name = learning.check_name(name, "--name") if name is not None else learning.slug(target)
    if alpha is not None:
        alpha = learning.check_positive(alpha, "--alpha")
    hardness = learning.check_positive(hardness, "--hardness")
    if boundary is not None:
        boundary = learning.check_positive(boundary, "--boundary")
    boundaries = learning.check_grid(
        parse_float_spec(grid, "grid") if grid is not None else learning.DEFAULT_GRID
    )
    learning.check_output(output, name=name, append=append, force=force)
    positives = learning.read_prompt_lines(positive_file) if positive_file is not None else []
    negatives = learning.read_prompt_lines(negative_file) if negative_file is not None else []
    # 2. What needs the model (its context, its fingerprint), before learning.
    model = load_cli_model(model_name, None, bridge=True)
    fed_back = len(learning.target_tokens(model, target)) - 1 if teacher_force else 0
    learning.check_fits(model, prompt, fed_back, where="PROMPT")
    learning.check_prompts_fit(model, [*positives, *negatives])
    learning.check_output(output, name=name, append=append, force=force, model=model)
    auto_steps = alpha is None and ctx.get_parameter_source("steps") == ParameterSource.DEFAULT
    learned = learning.learn(
        model,
        prompt,
        target,
        layer=layer,
        site=site,
        position=position,
        alpha=alpha,
        steps=steps,
        max_steps=max(steps, learning.AUTO_MAX_STEPS) if auto_steps else None,
        teacher_force=teacher_force,
    )
    used = learned.steps
    note = f"; {steps} step{'s' * (steps > 1)} did not reach top-1" if used != steps else ""
    click.echo(
        f"alpha = {learned.alpha:.6g} ({used} step{'s' * (used > 1)}{note}); "
        f"p({_target_shown(model, target)}) "
        f"{learned.prob_before:.4f} -> {learned.prob_after:.4f} at the key's position"
    )
    choice = None
    if boundary is None and (positives or negatives):
        choice = learning.search_boundary(
            model,
            learned,
            [p.text for p in positives],
            [p.text for p in negatives],
            hardness=hardness,
            grid=boundaries,
        )
        _print_boundary_table(choice)
        _print_failing(model, choice, positives, negatives)
        boundary = choice.boundary
    elif boundary is None:
        boundary = 0.25
    toml_path, tensor_path = learning.write_learned(
        output,
        learned,
        model,
        name=name,
        boundary=boundary,
        hardness=hardness,
        append=append,
        force=force,
        choice=choice,
    )
    click.echo(
        f"wrote {toml_path} and {tensor_path.name} (boundary {boundary:g}, hardness {hardness:g})"
    )


def _target_shown(model: Any, target: str) -> str:
    """The target's first token, which is what a step makes top-1 (all of them with
    --teacher-force), with how many tokens it has when more than one."""
    from meminject.learn import target_tokens

    ids = target_tokens(model, target)
    first = repr(model.token_str(ids[0]))
    return first if len(ids) == 1 else f"{first}, first of {len(ids)} tokens"


def _print_failing(model: Any, choice: Any, positives: Any, negatives: Any) -> None:
    """Which prompts the chosen boundary gets wrong, with their file and line."""
    for kind, failing, prompts, wrong in (
        ("positive", choice.failing_positives, positives, "does not give the target"),
        ("negative", choice.failing_negatives, negatives, "gives the target"),
    ):
        for index, token in failing:
            line = prompts[index]
            click.echo(
                f"  {kind} {line.where} {wrong} (top-1 {model.token_str(token)!r}): {line.text!r}"
            )
    if not choice.failing_positives and not choice.failing_negatives:
        click.echo("  every positive and negative is right at the chosen boundary")


def _print_boundary_table(choice: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"boundary search ({choice.n_positives} positives, {choice.n_negatives} negatives)"
    )
    for column in ("boundary", "positives ok", "negatives ok", "accuracy"):
        table.add_column(column, justify="right")
    for row in choice.table:
        mark = "bold" if row.accuracy == choice.accuracy else ""
        table.add_row(
            f"{row.boundary:g}",
            f"{row.positives_ok}/{choice.n_positives}",
            f"{row.negatives_ok}/{choice.n_negatives}",
            f"{row.accuracy:.3f}",
            style=mark,
        )
    Console(highlight=False).print(table)
    click.echo(
        f"chosen boundary {choice.boundary:g} (accuracy {choice.accuracy:.3f}; centre of "
        "the widest best interval)"
    )
