"""The ``meminject evaluate`` command: an edit's report on its prompts, paraphrases,
near misses and unrelated prompts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from meminject.cli.options import (
    CONTINUATION_RULE,
    AliasOption,
    json_option,
    load_cli_model,
    model_option,
    outside_paths_option,
)


@click.command()
@click.argument("memory_paths", nargs=-1, required=True, type=click.Path())
@model_option("files")
@click.option(
    "--target",
    default=None,
    help=f"What the edit should make the model say next; its first token is scored "
    f"(required unless --counterfact). {CONTINUATION_RULE}",
)
@click.option(
    "--counterfact",
    "counterfact_file",
    type=click.Path(),
    default=None,
    help="A JSON file of edits in CounterFact's schema (requested_rewrite, "
    "paraphrase_prompts, neighborhood_prompts): efficacy, paraphrase, neighbourhood score "
    "and locality of the memories as one bank, against the unedited model.",
)
@click.option("--prompt", "edit_prompts", multiple=True, help="A prompt the edit was made on.")
@click.option("--positive", "positive_file", type=click.Path(), help="Paraphrases, one a line.")
@click.option("--negative", "negative_file", type=click.Path(), help="Near misses, one a line.")
@click.option("--neutral", "neutral_file", type=click.Path(), help="Unrelated prompts.")
@click.option(
    "--max-new-tokens",
    "max_new_tokens",
    cls=AliasOption,
    old_names=("--tokens",),
    default=5,
    show_default=True,
    type=click.IntRange(0, 256),
    help="Greedy tokens generated per prompt, with and without the memories.",
)
@click.option(
    "--fluency-tokens",
    default=0,
    show_default=True,
    type=click.IntRange(0, 1024),
    help="Also continue each prompt (--counterfact: each record's generation prompts, or "
    "its rewrite and paraphrases) greedily for this many tokens, with and without the "
    "memories, and report ROME's fluency (n-gram entropy, bits); 0: not measured.",
)
@json_option()
@outside_paths_option
def evaluate(
    memory_paths: Sequence[str],
    model_name: str | None,
    target: str | None,
    counterfact_file: str | None,
    edit_prompts: Sequence[str],
    positive_file: str | None,
    negative_file: str | None,
    neutral_file: str | None,
    max_new_tokens: int,
    fluency_tokens: int,
    as_json: bool,
    allow_outside_paths: bool,
) -> None:
    """Edit metrics of MEMORIES: reliability (--prompt), generalization (--positive),
    specificity (--negative) and the KL divergence on unrelated prompts (--neutral), with
    each prompt's continuation before and after."""
    from meminject.errors import BadInputError
    from meminject.learn import read_prompt_lines
    from meminject.loading import load_memories

    if counterfact_file is not None:
        _counterfact(
            memory_paths, model_name, counterfact_file, as_json, allow_outside_paths,
            bool(target or edit_prompts or positive_file or negative_file or neutral_file),
            fluency_tokens,
        )  # fmt: skip
        return
    if target is None:
        raise BadInputError("evaluate needs --target (or --counterfact FILE)")
    prompts: dict[str, Any] = {"edit": list(edit_prompts)}
    for kind, path in (
        ("positive", positive_file),
        ("negative", negative_file),
        ("neutral", neutral_file),
    ):
        prompts[kind] = read_prompt_lines(path) if path is not None else []
    memory_set = load_memories(memory_paths)
    model = load_cli_model(model_name, memory_set, bridge=True)

    from meminject.engine import compile_memories
    from meminject.evaluate import evaluate_edit

    compiled = compile_memories(model, memory_set, allow_outside_paths=allow_outside_paths)
    report = evaluate_edit(
        model, compiled, target=target, prompts=prompts, tokens=max_new_tokens,
        fluency_tokens=fluency_tokens,
    )  # fmt: skip
    if prompts["neutral"]:
        from meminject.evaluate import neutral_per_memory

        report.neutral_per_memory = neutral_per_memory(
            model, memory_set, prompts["neutral"], allow_outside_paths=allow_outside_paths
        )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False, allow_nan=False))
        return
    _print_edit_report(report)


def _counterfact(
    memory_paths: Sequence[str],
    model_name: str | None,
    path: str,
    as_json: bool,
    allow_outside_paths: bool,
    mixed: bool,
    fluency_tokens: int,
) -> None:
    from meminject.engine import compile_memories
    from meminject.errors import BadInputError
    from meminject.evaluate import evaluate_counterfact, read_counterfact
    from meminject.loading import load_memories

    if mixed:
        raise BadInputError(
            "--counterfact takes its prompts and targets from the file; drop --target, "
            "--prompt, --positive, --negative and --neutral"
        )
    records = read_counterfact(path)
    memory_set = load_memories(memory_paths)
    model = load_cli_model(model_name, memory_set, bridge=True)
    compiled = compile_memories(model, memory_set, allow_outside_paths=allow_outside_paths)
    result = evaluate_counterfact(model, compiled, records, fluency_tokens=fluency_tokens)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False))
        return
    m = result["metrics"]
    click.echo(f"{m['records']} edit{'s' * (m['records'] != 1)} from {path}, unedited → edited:")
    for name, meaning in (
        ("rewrite", "efficacy: p(new) > p(true) on the rewrite prompt"),
        ("rewrite_acc", "efficacy: every token of the new target top-1 (teacher-forced)"),
        ("paraphrase", "paraphrase: p(new) > p(true)"),
        ("neighborhood_score", "neighbourhood score: p(true) > p(new) on neighbours"),
    ):
        before, after = m.get(f"{name}_before"), m.get(f"{name}_after")
        if before is not None and after is not None:
            click.echo(f"  {meaning}: {before:.0%} → {after:.0%}")
    if "locality" in m:
        click.echo(f"  locality: neighbours' top-1 next token kept: {m['locality']:.0%}")
    if "fluency_before" in m:
        click.echo(
            f"  fluency: n-gram entropy of {fluency_tokens} greedy tokens: "
            f"{m['fluency_before']:.3f} → {m['fluency_after']:.3f} bits"
        )


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
    if report.excluded_positives:
        n = len(report.excluded_positives)
        console.print(
            f"generalization leaves out {n} positive prompt{'s' * (n != 1)} that "
            f"{'are edit prompts' if n != 1 else 'is an edit prompt'}: "
            + ", ".join(_escape(w) for w in report.excluded_positives)
        )
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
    if metrics["fluency_before"] is not None:
        console.print(
            f"fluency (ROME's n-gram entropy of {len(report.fluency)} prompts' longer "
            f"continuations): {metrics['fluency_before']:.3f} → "
            f"{metrics['fluency_after']:.3f} bits"
        )
    for name, alone in report.neutral_per_memory.items():
        console.print(
            f"neutral, memory {_escape(name)} alone: KL mean {alone['kl_mean']:.3g} nats, max "
            f"{alone['kl_max']:.3g}; top-1 kept {alone['top1_kept']:.0%}"
        )


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
