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
from meminject.schema import GATE_NAMES
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
@click.option(
    "--margin",
    default=0.5,
    show_default=True,
    type=float,
    help="Nats by which the target's log-probability must beat the runner-up's when the "
    "written file is run by generate (KV cache included); alpha is raised until it does.",
)
@click.option(
    "--gate",
    default="projection",
    show_default=True,
    type=click.Choice(GATE_NAMES),
    help="The similarity gate: projection (the blog's; --boundary is b < 1), cosine "
    "(--boundary is the minimum cosine) or distance (--boundary is the radius, in key norms).",
)
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
    help="Use this value of the gate's parameter instead of searching (without examples: "
    "0.25 for projection, 0.9 for cosine, 0.5 for distance).",
)
@click.option("--grid", default=None, help="Values to search, e.g. 0.05-0.95:0.05 (the default).")
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
    margin: float,
    gate: str,
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
    from meminject.schema import GATES
    from meminject.specs import parse_float_spec

    # 1. Everything that needs no model, before the model loads.
    name = learning.check_name(name, "--name") if name is not None else learning.slug(target)
    if alpha is not None:
        alpha = learning.check_positive(alpha, "--alpha")
    margin = learning.check_positive(margin, "--margin")
    hardness = learning.check_positive(hardness, "--hardness")
    if boundary is not None:
        boundary = learning.check_gate_value(boundary, gate)
    boundaries = learning.check_grid(
        parse_float_spec(grid, "grid") if grid is not None else GATES[gate].grid, gate
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
    shown = _target_shown(model, target)

    def tried(learned: Any, choice: Any, score: Any) -> None:
        if score.margin < margin:
            click.echo(
                f"alpha = {learned.alpha:.6g}: the file gives p({shown}) "
                f"{learning._p(score.prob_after)}, margin {score.margin:.3f} nats over "
                f"{score.runner_up!r}, below --margin {margin:g}"
            )

    fitted = learning.fit_and_write(
        model,
        prompt,
        target,
        output,
        layer=layer,
        site=site,
        name=name,
        position=position,
        alpha=alpha,
        steps=steps,
        max_steps=max(steps, learning.AUTO_MAX_STEPS) if auto_steps else None,
        teacher_force=teacher_force,
        margin=margin,
        gate=gate,
        hardness=hardness,
        boundary=boundary,
        positives=[p.text for p in positives],
        negatives=[p.text for p in negatives],
        grid=boundaries,
        append=append,
        force=force,
        on_learned=tried,
    )
    learned, score, choice = fitted.learned, fitted.score, fitted.choice
    used = learned.steps
    note = f"; {steps} step{'s' * (steps > 1)} did not reach the margin" if used != steps else ""
    raised = f"; raised {fitted.raised}x to reach the margin" if fitted.raised else ""
    click.echo(
        f"alpha = {learned.alpha:.6g} ({used} step{'s' * (used > 1)}{note}{raised}); "
        f"p({shown}) {learning._p(score.prob_before)} -> {learning._p(score.prob_after)} "
        f"with the written file (generate, {score.backend} backend), margin "
        f"{score.margin:.3f} nats over {score.runner_up!r}"
    )
    field = GATES[gate].field
    if choice is not None:
        _print_boundary_table(choice, field)
        _print_failing(model, choice, positives, negatives)
    toml_path, tensor_path = fitted.paths
    click.echo(
        f"wrote {toml_path} and {tensor_path.name} ({gate} gate, {field} {fitted.boundary:g}, "
        f"hardness {hardness:g})"
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


def _print_boundary_table(choice: Any, field: str = "boundary") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{field} search ({choice.n_positives} positives, {choice.n_negatives} negatives)"
    )
    for column in (field, "positives ok", "negatives ok", "accuracy"):
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
        f"chosen {field} {choice.boundary:g} (accuracy {choice.accuracy:.3f} on the examples "
        "that chose it; centre of the widest best interval)"
    )
    if choice.loo_accuracy is not None:
        click.echo(
            f"leave-one-out accuracy {choice.loo_accuracy:.3f}: each example scored with the "
            f"{field} chosen on the others"
        )
