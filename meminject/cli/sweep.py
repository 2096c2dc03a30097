"""The ``meminject sweep`` command: layers × τ (× encodings, × heads) over a dataset,
with random controls, intervals and a held-out check of the best cell. It imports
torch, pandas and matplotlib only inside its body, so ``meminject --help`` stays light.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from meminject.cli.options import (
    AliasOption,
    file_out_option,
    heads_option,
    load_cli_model,
    model_flag,
    model_option,
    number_option,
    output_option,
    show_progress,
)
from meminject.sweep.stats import DEFAULT_RANK, RANK_STATS

if TYPE_CHECKING:
    from meminject.plugins import Registry


@click.command()
@click.argument("dataset")
@model_option("toyworld")
@click.option(
    "--layers", "layer_spec", default="all", show_default=True, help="Layers: 0-11, 0,3,5, 0-11:2."
)
@click.option(
    "--tau", "tau_spec", default="1,2,4,8", show_default=True, help="τ values: 1,2,4 or 0.5-8:0.5."
)
@click.option(
    "--encoding",
    "encoding_spec",
    default="unembed",
    show_default=True,
    help="Comma-separated registered encoders (unembed, embed, layer, plugins'), each "
    "optionally with its parameters as a TOML inline table: 'pooled{reduce = \"max\"}'.",
)
@click.option(
    "--tau-units",
    type=click.Choice(["absolute", "resid_norm"]),
    default="absolute",
    show_default=True,
    help="absolute: add τ·v (the paper's); resid_norm: add a vector of length τ × the "
    "layer's mean residual-stream norm (measured on the dataset's prompts, printed and "
    "recorded), so one τ grid means the same at every layer and in every model.",
)
@heads_option(
    "Heads to route each memory through (SPEC: 0-3, 0,5 or all; --heads alone: all) "
    "(site attn_z: the head's value mix moves by τ·v·pinv(W_O[h]), so it writes the part "
    "of τ·v it can; one cell per head); omitted = the whole attention output."
)
@number_option(
    "--controls",
    0,
    click.IntRange(0, 1000),
    "Random-token control memories per prompt (same token count as the memory).",
)
@click.option(
    "--baselines",
    "baseline_spec",
    default="in-context,shuffled,explicit",
    show_default=True,
    metavar="LIST",
    help="What each memory is also compared with: in-context (its text before the prompt, "
    "no injection: one more pass per batch), shuffled (another row's memory in the same "
    "cell: one more pass per cell) and explicit (the row's explicit one-hop prompt: does "
    "the model know the fact; one more pass per batch, when every row has one), "
    "comma-separated, or none.",
)
@click.option(
    "--positions",
    type=click.Choice(["all", "last", "not-bos"]),
    default="all",
    show_default=True,
    help="Where each cell adds its vector: every position (the paper's), the prompt's last "
    "token only, or every position but the first (BOS, the attention sink): the mechanism "
    "ablations; one per run, recorded in the records.",
)
@click.option(
    "--control-norm",
    type=click.Choice(["memory", "own"]),
    default="memory",
    show_default=True,
    help="How long each random-token control's vector is, with absolute τ: the length of "
    "the row's memory vector in the same cell (the control differs in direction only), or "
    "its own encoding's length (the paper's controls, matched by token count only). With "
    "--tau-units resid_norm every vector has length τ·N and both are the same.",
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--shard", default="0/1", show_default=True, help="Take rows i, i+n, … (0-based).")
@click.option(
    "--answer-metric",
    type=click.Choice(["first-token", "full"]),
    default="first-token",
    show_default=True,
    help="p(answer's first token), or p(whole answer) teacher-forced.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the controls.")
@click.option("--limit", default=None, type=click.IntRange(0), help="Use the first N rows only.")
@click.option(
    "-D",
    "--dataset-option",
    "dataset_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option of the dataset's loader (repeatable; VALUE is read as TOML, else as a "
    "string); meminject datasets lists each loader's options.",
)
@click.option("--prompt-column", default=None, help="CSV column of the prompt.")
@click.option("--memory-column", default=None, help="CSV column of the memory text.")
@click.option("--answer-column", default=None, help="CSV column of the answer.")
@click.option("--explicit-column", default=None, help="CSV column of the explicit prompt.")
@output_option(
    "Tidy records, one row per prompt × cell × memory (.csv or .parquet).",
    old_names=("--out",),
)
@file_out_option(
    "--plot",
    help="Layers × τ heatmap (PNG) of the --plot-stat statistic (default: the --rank-by "
    "one, median_gain: the median prompt's gain in nats).",
)
@click.option(
    "--plot-stat",
    type=click.Choice(list(RANK_STATS)),
    default=None,
    help="What the heatmap shows (default: the --rank-by statistic).",
)
@click.option(
    "--rank-by",
    type=click.Choice(list(RANK_STATS)),
    default=DEFAULT_RANK,
    show_default=True,
    help="What orders the top table and picks the best cell: median_gain (the median "
    "prompt's gain over both no memory and the controls, in nats), median_effect, "
    "median_lift, shares, mean_dp, median_pct, or the paper's mean_pct. The best cell is "
    "always one whose median prompt improved.",
)
@click.option("--force", is_flag=True, help="Overwrite the --output and --plot files.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted sweep from the partial results beside --output "
    "(OUT.partial.csv/.parquet) instead of recomputing its finished prompts.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where the passes run: local (this process) or ray (the rows split into shards "
    "of whole batches, one Ray task each, on a Ray cluster; needs "
    'pip install "meminject[ray]"). Both give the same records, and --resume continues '
    "either's partial results.",
)
@click.option(
    "--address",
    default=None,
    metavar="HOST:PORT",
    help="With --executor ray: the Ray cluster to run on (the address `ray start --head` "
    "prints, e.g. 10.0.0.1:6379; auto: the cluster `ray start` runs on this machine). "
    "Default: RAY_ADDRESS, else a new Ray instance on this machine's cores, shut down at "
    "the end. The model must load on every node: a registered model, or a path that "
    "exists on each.",
)
@click.option(
    "--tasks",
    type=click.IntRange(1),
    default=None,
    help="With --executor ray: how many Ray tasks the rows are split into (each task "
    "loads the model once per worker and is checkpointed when it ends). Default: 4 per "
    "task the cluster can run at once (one per CPU, or per --threads CPUs; one per GPU "
    "with --device cuda).",
)
@click.option(
    "--show-top",
    "top",
    cls=AliasOption,
    old_names=("--top",),
    default=10,
    show_default=True,
    type=click.IntRange(0),
    help="How many of the best cells to show.",
)
def sweep(
    dataset: str,
    model_name: str,
    layer_spec: str,
    tau_spec: str,
    encoding_spec: str,
    tau_units: str,
    head_spec: str | None,
    controls: int,
    baseline_spec: str,
    positions: str,
    control_norm: str,
    batch_size: int,
    shard: str,
    answer_metric: str,
    seed: int,
    limit: int | None,
    dataset_options: tuple[str, ...],
    prompt_column: str | None,
    memory_column: str | None,
    answer_column: str | None,
    explicit_column: str | None,
    output: Path | None,
    plot: Path | None,
    plot_stat: str | None,
    rank_by: str,
    force: bool,
    resume: bool,
    executor: str,
    address: str | None,
    tasks: int | None,
    top: int,
) -> None:
    """Measure how much injecting each row's memory raises p(answer), per (layer, τ,
    encoding[, head]), against random-token controls (Sakarvadia et al. 2023).

    DATASET is a registered dataset (toyworld), NAME:PATH for a registered loader
    reading a file, a file whose suffix a loader claims, or a CSV in the paper's columns
    (obscure_sentence, explicit_entity, answer); meminject datasets lists the loaders.
    """
    from meminject.datasets import parse_options, resolve_dataset
    from meminject.errors import BadInputError, RowError
    from meminject.plots import plot_heatmap
    from meminject.plugins import get_registry
    from meminject.specs import (
        parse_encoding_list,
        parse_float_spec,
        parse_int_spec,
        parse_shard,
    )
    from meminject.sweep import SweepConfig, SweepFiles, encoding_label, run_sweep

    # Everything that can be checked without the model is checked before loading it.
    registry = get_registry()
    taus = parse_float_spec(tau_spec, "tau")
    baselines = _baselines(baseline_spec)
    try:
        encodings = list(
            dict.fromkeys(encoding_label(e, registry) for e in parse_encoding_list(encoding_spec))
        )
    except BadInputError as exc:
        raise click.BadParameter(str(exc), param_hint="--encoding") from None
    shard_pair = parse_shard(shard)
    if executor != "ray":
        for flag, value in (("--address", address), ("--tasks", tasks)):
            if value is not None:
                raise BadInputError(f"{flag} is an option of --executor ray")
    else:
        from meminject.sweep.ray_executor import check_address, require_ray

        require_ray()
        if address is not None:
            check_address(address)
    files = SweepFiles.plan(output, resume=resume, force=force)
    if plot is not None and plot.exists() and not force:
        raise BadInputError(f"{plot} exists; pass --force to overwrite it")
    rows = resolve_dataset(
        dataset,
        registry,
        options=parse_options(dataset_options),
        prompt_column=prompt_column,
        memory_column=memory_column,
        answer_column=answer_column,
        explicit_column=explicit_column,
        limit=limit,
    )
    model = load_cli_model(model_name, None, bridge=True)
    dims = model.dims
    layers = parse_int_spec(layer_spec, "layer", universe=range(dims.n_layers))
    heads = parse_int_spec(head_spec, "head", universe=range(dims.n_heads)) if head_spec else None
    config = SweepConfig(
        layers=tuple(layers),
        taus=tuple(taus),
        encodings=tuple(encodings),
        heads=tuple(heads) if heads is not None else None,
        controls=controls,
        batch_size=batch_size,
        shard=shard_pair,
        metric=answer_metric,
        seed=seed,
        tau_units=tau_units,
        baselines=baselines,
        positions=positions,
        control_norm=control_norm,
    )

    checkpoint = files.checkpoint if files.partial is not None else None
    try:
        if executor == "ray":
            from meminject.sweep import run_sweep_ray

            result = run_sweep_ray(
                model,
                rows,
                config,
                address=address,
                tasks=tasks,
                threads=model_flag("threads") or 1,
                allow_pickle_weights=bool(model_flag("allow_pickle_weights")),
                registry=registry,
                progress=show_progress(),
                done=files.done,
                checkpoint=checkpoint,
            )
        else:
            result = run_sweep(
                model,
                rows,
                config,
                registry=registry,
                progress=show_progress(),
                done=files.done,
                checkpoint=checkpoint,
            )
    except RowError as exc:  # "row 3: …" alone does not say which dataset's row 3
        raise exc.in_dataset(_source(dataset, registry)) from None
    files.finish(result.records)
    summary = result.summary
    if plot is not None and not summary.empty:
        shown = dataset.rpartition("/")[2]  # a file's name, not its whole path
        per_head = " · heads" if heads is not None else ""
        title = (
            f"{model.name} · {shown} · {answer_metric}{per_head} · {result.stats['rows']} prompts"
        )
        plot_heatmap(summary, plot, stat=plot_stat or rank_by, title=title, force=force)
    chance = (min(model.facts.d_head, dims.d_model) / dims.d_model) ** 0.5
    _print_summary(result, top, output, plot, rank_by, chance_share=chance)


def _source(dataset: str, registry: Registry) -> str:
    """How a row error names its dataset: the file (as given) or the registered name."""
    from meminject.datasets import dataset_target

    name, path = dataset_target(dataset, registry)
    return path if path is not None else f"dataset '{name}'"


def _fmt_pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.0f}%" if abs(value) >= 100 else f"{value:+.1f}%"


def _fmt_nats(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.3f}"


def _fmt_ci(low: Any, high: Any) -> str:
    if _is_na(low) or _is_na(high):
        return ""
    return f"[{low:+.3f}, {high:+.3f}]"


def _fmt_share(value: Any) -> str:
    return "–" if _is_na(value) else f"{value:.0%}"


def _print_summary(
    result: Any,
    top: int,
    out: Path | None,
    plot: Path | None,
    rank_by: str = DEFAULT_RANK,
    *,
    chance_share: float | None = None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    from meminject.sweep.stats import ranked

    # Not a terminal (a pipe, a log file): use a width the table fits in.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    stats = result.stats
    summary = result.summary
    console.print(
        f"{stats['rows']} prompts × {stats['cells']} cells "
        f"({stats['base_passes']} base passes, {stats['replays']} replays, "
        f"{stats['full_passes']} full passes) in {stats['seconds']:.1f} s"
        + (
            f" on {stats['tasks']} Ray tasks ({stats['workers']} workers)"
            if "tasks" in stats
            else ""
        )
    )
    if "resid_norms" in stats:
        listed = ", ".join(f"ℓ{layer} {norm:.3g}" for layer, norm in stats["resid_norms"].items())
        console.print(f"τ in units of each layer's mean residual-stream norm: {listed}")
    if summary.empty:
        console.print("no rows in this shard")
        return
    has_controls = bool(summary["control_n"].max() > 0)
    if not has_controls:
        console.print(
            "no control was run (--controls 0): effects are against no injection only, not "
            "against a random memory of the same size; pass --controls 3 or more"
        )
    table = Table(title=f"top {min(top, len(summary))} cells by {rank_by}")
    for column in ("layer", "head", "τ", "enc", "p before", "p after"):
        table.add_column(column, justify="right")
    per_head = "head_share" in summary and bool(summary["head"].notna().any())
    if per_head:
        table.add_column("share", justify="right")  # of the memory the head can write
    table.add_column("median gain [95% CI]", justify="right", style="bold")
    if has_controls:
        table.add_column("vs controls", justify="right")
        table.add_column("beats ctrl", justify="right")
    table.add_column("median %", justify="right")
    table.add_column("improved", justify="right")
    table.add_column("mean % (paper)", justify="right")
    if has_controls:
        table.add_column("ctrl improved", justify="right")
    disagree = False
    for cell in ranked(summary, rank_by).head(top).itertuples(index=False):
        mark = ""
        if cell.mean_pct_disagrees:
            mark, disagree = " †", True
        cells = [
            str(cell.layer),
            "all" if _is_na(cell.head) else str(cell.head),
            f"{cell.tau:g}",
            str(cell.encoding),
            f"{cell.p_before:.4f}",
            f"{cell.p_after:.4f}",
        ]
        if per_head:
            cells.append(_fmt_share(cell.head_share))
        cells += [
            f"{_fmt_nats(cell.median_gain)} {_fmt_ci(cell.gain_ci_low, cell.gain_ci_high)}",
        ]
        if has_controls:
            cells += [_fmt_nats(cell.median_effect), _fmt_share(cell.share_beats_controls)]
        cells += [
            _fmt_pct(cell.median_pct),
            _fmt_share(cell.share_improved),
            _fmt_pct(cell.mean_pct) + mark,
        ]
        if has_controls:
            cells.append(_fmt_share(cell.control_share_improved))
        table.add_row(*cells)
    if top:
        console.print(table)
        console.print(
            "gain: per prompt, the smaller of log p(answer) with the memory − without it and "
            "− with a random control memory (nats; > 0: the memory helps beyond both)"
        )
        if per_head:
            chance = "" if chance_share is None else f": {chance_share:.2f} for a random vector"
            console.print(
                "share: ‖v·P_h‖/‖v‖, how much of the memory head h can write (its output "
                f"projection spans d_head of d_model directions, √(d_head/d_model){chance})"
            )
        if disagree:
            console.print(
                "† the mean % and the median % disagree in sign: the mean is carried by a "
                "few prompts whose base probability is tiny"
            )
    best = result.best(rank_by)
    if best is None:
        first = ranked(summary, rank_by).iloc[0]
        console.print(
            "no cell helps: in none did the median prompt's p(answer) rise"
            + (" and beat its controls" if has_controls else "")
            + f" (highest median gain {_fmt_nats(first['median_gain'])} at layer "
            f"{first['layer']}, τ = {first['tau']:g}, {first['encoding']})"
        )
    else:
        head = best["head"]
        where = f"layer {best['layer']}" + ("" if _is_na(head) else f" head {head}")
        ci = _fmt_ci(best["gain_ci_low"], best["gain_ci_high"])
        sure = "" if best["gain_ci_low"] > 0 else " (its interval includes 0: not significant)"
        line = (
            f"best cell by {rank_by}: {where}, τ = {best['tau']:g}, encoding "
            f"{best['encoding']}: median gain {_fmt_nats(best['median_gain'])} nats {ci}{sure}; "
            f"median change {_fmt_pct(best['median_pct'])}, "
            f"{best['share_improved']:.0%} of prompts improved"
        )
        if has_controls:
            line += (
                f", {best['share_beats_controls']:.0%} beat their controls "
                f"(controls: {best['control_share_improved']:.0%} improved)"
            )
        line += f"; the paper's mean % increase {_fmt_pct(best['mean_pct'])}"
        console.print(line)
        _print_baselines(console, best)
    _print_held_out(console, result.records, rank_by)
    _print_familywise(console, result.records)
    for label, path in (("records", out), ("heatmap", plot)):
        if path is not None:
            console.print(f"{label}: {path}")


def _baselines(spec: str) -> tuple[str, ...]:
    """``--baselines``: a comma-separated list, or none."""
    from meminject.sweep.config import BASELINES

    names = [part.strip() for part in spec.split(",") if part.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in BASELINES]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown baseline '{unknown[0] if unknown else spec}'; choose "
            f"{', '.join(BASELINES)}, a comma-separated list of them, or none",
            param_hint="--baselines",
        )
    return tuple(dict.fromkeys(names))


def _print_baselines(console: Any, best: dict[str, Any]) -> None:
    """How the best cell compares with prompting and with another row's memory, its
    accuracy, and how it fares on facts the model knows (the explicit prompts)."""
    import math

    parts = []
    prompting = best.get("median_vs_in_context", math.nan)
    if not math.isnan(prompting):
        parts.append(
            f"against its text in the prompt instead (in-context: median lift "
            f"{_fmt_nats(best['in_context_lift'])} nats), injecting is "
            f"{_fmt_nats(prompting)} nats "
            f"{_fmt_ci(best['vs_in_context_ci_low'], best['vs_in_context_ci_high'])} "
            f"({best['share_beats_in_context']:.0%} of prompts do better injected)"
        )
    shuffled = best.get("median_vs_shuffled", math.nan)
    if not math.isnan(shuffled):
        parts.append(
            f"against another row's memory in the same cell (shuffled): "
            f"{_fmt_nats(shuffled)} nats "
            f"{_fmt_ci(best['vs_shuffled_ci_low'], best['vs_shuffled_ci_high'])} "
            f"({best['share_beats_shuffled']:.0%} beat it)"
        )
    if parts:
        console.print("baselines of that cell: " + "; ".join(parts))
    if not math.isnan(best.get("top1_after", math.nan)):
        line = (
            f"accuracy of that cell: the answer is the top next token for "
            f"{best['top1_before']:.0%} of prompts without the memory, {best['top1_after']:.0%} "
            f"with it ({best['top5_after']:.0%} in the top 5; median rank "
            f"{best['median_rank_before']:g} → {best['median_rank_after']:g})"
        )
        if not math.isnan(best.get("top1_in_context", math.nan)):
            line += f", {best['top1_in_context']:.0%} with its text in the prompt"
        console.print(line)
    known = best.get("share_explicit_known", math.nan)
    if not math.isnan(known):
        console.print(
            f"the explicit prompts: the model answers {known:.0%} of them (top 1); median "
            f"gain where it does {_fmt_nats(best['median_gain_known'])}, where it does not "
            f"{_fmt_nats(best['median_gain_unknown'])}; the memory closes a median "
            f"{_fmt_share(best['median_gap_closed'])} of the explicit-vs-obscure gap"
        )


def _print_held_out(console: Any, records: Any, rank_by: str) -> None:
    """The best of many cells is partly luck; say how the choice fares on prompts that
    did not take part in it (sweep.stats.held_out_check)."""
    from meminject.sweep.stats import held_out_check

    check = held_out_check(records, rank_by)
    if check is None:
        return
    n_sel, n_out, cell = check["n_selection"], check["n_held_out"], check["cell"]
    if cell is None:
        console.print(
            f"held-out check: chosen on half of the prompts ({n_sel}), no cell helps there either"
        )
        return
    head = "" if _is_na(cell["head"]) else f" head {cell['head']}"
    low, high = cell["held_out_ci"]
    verdict = "it holds up" if low > 0 else "not confirmed: the interval includes 0"
    console.print(
        f"held-out check (the best of many cells is partly luck): chosen on {n_sel} "
        f"prompts, layer {cell['layer']}{head}, τ = {cell['tau']:g}, {cell['encoding']} has "
        f"median gain {_fmt_nats(cell['selection_median_gain'])} "
        f"{_fmt_ci(*cell['selection_ci'])} there and "
        f"{_fmt_nats(cell['held_out_median_gain'])} {_fmt_ci(low, high)} on the other "
        f"{n_out}{' (halves split by memory)' if check['by_memory'] else ''}; {verdict}"
    )


def _print_familywise(console: Any, records: Any) -> None:
    """Whether any cell beats chance once the number of cells is paid for
    (sweep.familywise: sign flips, max-T over cells)."""
    from meminject.sweep.familywise import ALPHA, familywise_test

    test = familywise_test(records)
    if test is None:
        return
    best = test.cells.iloc[0]
    head = "" if _is_na(best["head"]) else f" head {best['head']}"
    against = "its controls" if test.measure == "effect" else "no memory (no controls were run)"
    console.print(
        f"family-wise test (sign flips of {test.n_units} {test.units}, max-t over "
        f"{len(test.cells)} cells, the memory's log p against {against}): "
        f"{test.significant} cell{'' if test.significant == 1 else 's'} significant at "
        f"{ALPHA:.0%}; the highest t, layer {best['layer']}{head}, τ = {best['tau']:g}, "
        f"{best['encoding']}, has adjusted p = {best['p_adjusted']:.3g}"
    )


def _is_na(value: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
