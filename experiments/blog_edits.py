"""The local-memory blog's two edits on a real model, judged with ``meminject evaluate``.

For each edit (Nepal → " Kathmandu", and the deliberately wrong Tokyo → " Kathmandu"),
each site (attention before W_O, ``attn_z``; the MLP after its activation, ``mlp_post``)
and each gate (the blog's ``projection``, and the local ``cosine`` and ``distance``),
this learns a gated memory on the blog's learning prompt as ``meminject learn`` does (the
written file, run through generate, must put the target 0.5 nats above the runner-up),
chooses the gate's parameter on a *tuning* split of the blog's positives and negatives
(every other line; the edit prompt, which the positives files start with, is left out of
both), and evaluates it on the tuning split, on the disjoint *test* split and on
``neutral_prompts.txt`` (held out). Both splits are reported: the tuning figures are
optimistic, the test figures are not (but rest on 2–4 prompts each).

    python experiments/blog_edits.py --model smollm2-135m
    python experiments/blog_edits.py --model gemma3-270m --gates cosine

Writes ``experiments/results/blog_edits_<model>.md`` (tables) and ``.json``; the blog's
prompt files are read from ``../shared/data/local_memory_blog/`` and not copied here:
their prompts appear in the results as ``file:line``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOG = HERE.parents[1] / "shared" / "data" / "local_memory_blog"

# (edit, learning prompt, target, the blog's GPT-2 layers for attention and MLP)
EDITS = [
    ("nepal", "The capital city of Nepal is located in", " Kathmandu", 5, 2),
    ("tokyo", "The city of Tokyo lies in the country of", " Kathmandu", 9, 7),
]


def scaled(layer: int, n_layers: int) -> int:
    """The blog's GPT-2 layer (of 12) at the same relative depth of this model."""
    return min(n_layers - 1, round(layer * n_layers / 12))


def split(lines: list, prompt: str) -> tuple[list, list]:
    """(tuning, test): every other line, the edit prompt left out (it measures reliability)."""
    from meminject.evaluate import prompt_key

    kept = [p for p in lines if prompt_key(p.text) != prompt_key(prompt)]
    return kept[0::2], kept[1::2]


def main() -> None:
    import meminject
    from meminject.errors import MeminjectError
    from meminject.evaluate import evaluate_edit
    from meminject.learn import fit_and_write, read_prompt_lines

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=5)
    parser.add_argument(
        "--gates", default="projection,cosine,distance", help="Comma-separated gates to run."
    )
    parser.add_argument("--edits", default="nepal,tokyo", help="Comma-separated edits to run.")
    parser.add_argument(
        "--render-only", action="store_true", help="Rewrite the .md from the saved .json."
    )
    parser.add_argument(
        "--fresh", action="store_true", help="Drop the saved entries of other edits and gates."
    )
    parser.add_argument(
        "--docs-table",
        action="store_true",
        help="Print docs/local-memories.md's table of both models from the saved .json files.",
    )
    args = parser.parse_args()
    if args.docs_table:
        print(docs_table(), end="")
        return
    stem = HERE / "results" / f"blog_edits_{args.model}"
    if args.render_only:
        results = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        for entry in results:
            leave_out_edit_prompt(entry)
            for row in entry.get("prompts", ()):
                without_blog_text(row)
        text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
        stem.with_suffix(".json").write_text(text, encoding="utf-8")
        stem.with_suffix(".md").write_text(render(args.model, results), encoding="utf-8")
        return
    if not BLOG.is_dir():
        raise SystemExit(f"the blog's prompts are not at {BLOG}")
    gates = [g.strip() for g in args.gates.split(",") if g.strip()]
    edits = {e.strip() for e in args.edits.split(",")}
    model = meminject.load_model(args.model)
    neutral = read_prompt_lines(HERE / "neutral_prompts.txt")
    # Entries of earlier runs that this one does not redo are kept (so the edits and gates
    # can be run in parts); an entry from before the split counts as the projection gate's.
    results = []
    if stem.with_suffix(".json").is_file() and not args.fresh:
        results = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        results = [
            r for r in results if r["edit"] not in edits or r.get("gate", "projection") not in gates
        ]
    for edit, prompt, target, attn_layer, mlp_layer in EDITS:
        if edit not in edits:
            continue
        positives = read_prompt_lines(BLOG / f"{edit}_positives.txt")
        negatives = read_prompt_lines(BLOG / f"{edit}_negatives.txt")
        tune_pos, test_pos = split(positives, prompt)
        tune_neg, test_neg = split(negatives, prompt)
        role = {p.where: "tune" for p in [*tune_pos, *tune_neg]}
        role.update({p.where: "test" for p in [*test_pos, *test_neg]})
        for site, blog_layer in (("attn_z", attn_layer), ("mlp_post", mlp_layer)):
            layer = scaled(blog_layer, model.dims.n_layers)
            for gate in gates:
                started = time.perf_counter()
                entry = {
                    "edit": edit, "site": site, "layer": layer, "gate": gate, "prompt": prompt
                }  # fmt: skip
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        fitted = fit_and_write(
                            model,
                            prompt,
                            target,
                            Path(tmp) / "edit.toml",
                            layer=layer,
                            site=site,
                            name=f"{edit}-{site}-{gate}",
                            max_steps=3,
                            gate=gate,
                            positives=[p.text for p in tune_pos],
                            negatives=[p.text for p in tune_neg],
                        )
                    except MeminjectError as exc:
                        entry["error"] = str(exc)
                        results.append(entry)
                        print(f"{edit} {site} L{layer} {gate}: {exc}", flush=True)
                        continue
                    report = evaluate_edit(
                        model,
                        [fitted.paths[0]],
                        target=target,
                        prompts={
                            "edit": [prompt],
                            "positive": positives,
                            "negative": negatives,
                            "neutral": neutral,
                        },
                        tokens=args.tokens,
                    )
                learned, choice = fitted.learned, fitted.choice
                payload = report.to_json()
                for row in payload["prompts"]:
                    row["split"] = role.get(row["where"])
                entry.update(
                    alpha=learned.alpha,
                    steps=learned.steps,
                    raised=fitted.raised,
                    boundary=fitted.boundary,
                    tuning_accuracy=choice.accuracy if choice else None,
                    loo_accuracy=choice.loo_accuracy if choice else None,
                    p_before=fitted.score.prob_before,
                    p_after=fitted.score.prob_after,
                    margin=fitted.score.margin,
                    seconds=round(time.perf_counter() - started, 1),
                    **payload,
                )
                results.append(entry)
                results.sort(key=order)
                m = split_metrics(entry)
                print(
                    f"{edit} {site} L{layer} {gate}: α {learned.alpha:.3g}, "
                    f"{fitted.boundary:g}; generalization tune/test {m['tune']['generalization']}"
                    f"/{m['test']['generalization']}, specificity tune/test "
                    f"{m['tune']['specificity']}/{m['test']['specificity']}, neutral KL "
                    f"{m['all']['neutral_kl_mean']:.3g} ({entry['seconds']} s)",
                    flush=True,
                )
                stem.parent.mkdir(exist_ok=True)
                save(stem, args.model, results)
    save(stem, args.model, results)
    print(f"wrote {stem}.md and .json")


#: The models of docs/local-memories.md's table, with the names it shows.
DOC_MODELS = (("smollm2-135m", "SmolLM2"), ("gemma3-270m", "Gemma 3"))


def docs_table() -> str:
    """One row per model, edit, site and gate, from the saved results (numbers only)."""
    lines = [
        "| model | edit | site, layer | gate | α | parameter | margin (nats) | reliability "
        "| generalization tune / test | specificity tune / test | leave-one-out "
        "| neutral top-1 kept | neutral KL mean / max |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, shown in DOC_MODELS:
        path = HERE / "results" / f"blog_edits_{model}.json"
        for r in sorted(json.loads(path.read_text(encoding="utf-8")), key=order):
            gate = r.get("gate", "projection")
            where = f"{shown} | {r['edit'].capitalize()} | `{r['site']}` {r['layer']} | {gate}"
            if "error" in r:
                lines.append(f"| {where} | — | — | — | learning failed | | | | | |")
                continue
            m = split_metrics(r)["all"]
            lines.append(
                f"| {where} | {edit_cells(r)} | {m['neutral_top1_kept']:.0%} | "
                f"{m['neutral_kl_mean']:.2g} / {m['neutral_kl_max']:.2g} |"
            )
    return "\n".join(lines) + "\n"


def order(entry: dict) -> tuple:
    """Edits, then sites, then gates, in the order the script runs them."""
    gates = ("projection", "cosine", "distance")
    gate = entry.get("gate", "projection")
    return (
        [e[0] for e in EDITS].index(entry["edit"]),
        ("attn_z", "mlp_post").index(entry["site"]),
        gates.index(gate) if gate in gates else len(gates),
        "gate" in entry,
    )


def save(stem: Path, model: str, results: list[dict]) -> None:
    for entry in results:
        for row in entry.get("prompts", ()):
            without_blog_text(row)
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    stem.with_suffix(".json").write_text(text, encoding="utf-8")
    stem.with_suffix(".md").write_text(render(model, results), encoding="utf-8")


def leave_out_edit_prompt(entry: dict) -> None:
    """A run from before generalization left out the edit prompt (the blog's positives
    files start with it) counted it as a paraphrase: drop that row, reading the blog's file
    for the text the results do not keep."""
    from meminject.evaluate import prompt_key

    if "prompts" not in entry or "excluded_positives" in entry:
        return
    kept, left_out = [], []
    for row in entry["prompts"]:
        text = row["prompt"]
        where = row.get("where") or ""
        if text is None and ":" in where and BLOG.is_dir():
            name, line = where.rsplit(":", 1)
            text = (BLOG / name).read_text(encoding="utf-8").split("\n")[int(line) - 1].strip()
        if row["kind"] == "positive" and text and prompt_key(text) == prompt_key(entry["prompt"]):
            left_out.append(where or text)
        else:
            kept.append(row)
    entry["prompts"] = kept
    entry["excluded_positives"] = left_out


def without_blog_text(row: dict) -> dict:
    """The blog's prompt files stay outside the repository: a row read from one keeps
    its ``file:line``, not its text (the model's continuations are ours to keep)."""
    where = row.get("where") or ""
    if where and Path(where.rsplit(":", 1)[0]).resolve().parent == BLOG.resolve():
        row["where"] = f"{Path(where).name}"
        row["prompt"] = None
    return row


def metrics(entry: dict, rows: list[dict] | None = None) -> dict:
    """The metrics of a saved entry (or of some of its prompts), recomputed from its
    prompts (so a renderer newer than the run reports every current metric)."""
    from meminject.evaluate import EditReport, PromptResult

    fields = set(PromptResult.__dataclass_fields__)
    report = EditReport(entry["target"], entry["target_token"])
    chosen = entry["prompts"] if rows is None else rows
    report.rows = [PromptResult(**{k: v for k, v in p.items() if k in fields}) for p in chosen]
    return report.metrics


def split_metrics(entry: dict) -> dict[str, dict]:
    """Metrics over all prompts, and over the tuning and the test split's positives and
    negatives (a run before the split has no ``split``: everything counts as tuning)."""
    out = {"all": metrics(entry)}
    for name in ("tune", "test"):
        rows = [
            p
            for p in entry["prompts"]
            if p["kind"] in ("positive", "negative") and p.get("split", "tune") == name
        ]
        out[name] = metrics(entry, rows)
    return out


def margin_cell(entry: dict) -> str:
    margin = entry.get("margin")
    return "—" if margin is None else f"{margin:.2f}"


def edit_cells(entry: dict) -> str:
    """The cells both tables share: α, the gate's parameter, the margin, reliability,
    generalization and specificity on the tuning / test halves, leave-one-out."""
    s = split_metrics(entry)
    m, tune, test = s["all"], s["tune"], s["test"]
    loo = entry.get("loo_accuracy")
    return (
        f"{entry['alpha']:.3g} | {entry['boundary']:g} | {margin_cell(entry)} | "
        f"{m['reliability']:.0%} | "
        f"{share(tune['generalization'], tune['counts']['positive'])} / "
        f"{share(test['generalization'], test['counts']['positive'])} | "
        f"{share(tune['specificity'], tune['counts']['negative'])} / "
        f"{share(test['specificity'], test['counts']['negative'])} | "
        f"{'—' if loo is None else f'{loo:.0%}'}"
    )


def share(value: float | None, n: int) -> str:
    return "—" if value is None else f"{value:.0%} ({n})"


def render(model: str, results: list[dict]) -> str:
    lines = [f"# The blog's edits on {model}\n", "Generated by `experiments/blog_edits.py`.\n"]
    lines += [
        "The gate's parameter is chosen on the tuning split of the positives and negatives "
        "and scored on both; the test split did not choose it. The edit prompt is left out "
        "of generalization. Neutral prompts are held out.\n",
        "| edit | site | layer | gate | α | parameter | margin | reliability "
        "| generalization tune / test | specificity tune / test | leave-one-out (tuning) "
        "| negatives' continuations kept | neutral top-1 kept | neutral KL mean / max (nats) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for r in results:
        gate = r.get("gate", "projection")
        if "error" in r:
            lines.append(
                f"| {r['edit']} | `{r['site']}` | {r['layer']} | {gate} | failed: "
                f"{r['error'].replace('|', '/')} |"
            )
            continue
        m = split_metrics(r)["all"]
        lines.append(
            f"| {r['edit']} | `{r['site']}` | {r['layer']} | {gate} | {edit_cells(r)} | "
            f"{m['negative_continuations_kept']:.0%} | "
            f"{m['neutral_top1_kept']:.0%} | "
            f"{m['neutral_kl_mean']:.3g} / {m['neutral_kl_max']:.3g} |"
        )
    for r in results:
        if "error" in r:
            continue
        lines += [
            "",
            f"## {r['edit']}, `{r['site']}`, layer {r['layer']}, {r.get('gate', 'projection')} "
            "gate",
            "",
            "| kind | split | ok | prompt | original continuation | edited continuation |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for p in r["prompts"]:
            shown = p["prompt"] if p["prompt"] is not None else f"`{p['where']}`"
            cells = [p["kind"], p.get("split") or "", "yes" if p["ok"] else "**no**", shown]
            cells += [repr(p["continuation_before"]), repr(p["continuation_after"])]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
