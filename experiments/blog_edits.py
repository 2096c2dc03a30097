"""The local-memory blog's two edits on a real model, judged with ``meminject evaluate``.

For each edit (Nepal → " Kathmandu", and the deliberately wrong Tokyo → " Kathmandu")
and each site (attention before W_O, ``attn_z``; the MLP after its activation,
``mlp_post``), this learns a gated memory on the blog's learning prompt, picks its
boundary on the blog's positives and negatives (as ``meminject learn`` does), and
evaluates it on those prompts plus ``neutral_prompts.txt``. The boundary is chosen on
the same positives and negatives it is scored on, as in the blog: generalization and
specificity are therefore optimistic; the neutral set is held out.

    python experiments/blog_edits.py --model smollm2-135m
    python experiments/blog_edits.py --model gemma3-270m

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


def main() -> None:
    import meminject
    from meminject.errors import MeminjectError
    from meminject.evaluate import evaluate_edit
    from meminject.learn import learn, read_prompt_lines, search_boundary, write_learned

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=5)
    parser.add_argument(
        "--render-only", action="store_true", help="Rewrite the .md from the saved .json."
    )
    args = parser.parse_args()
    stem = HERE / "results" / f"blog_edits_{args.model}"
    if args.render_only:
        results = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        for entry in results:
            for row in entry.get("prompts", ()):
                without_blog_text(row)
        text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
        stem.with_suffix(".json").write_text(text, encoding="utf-8")
        stem.with_suffix(".md").write_text(render(args.model, results), encoding="utf-8")
        return
    if not BLOG.is_dir():
        raise SystemExit(f"the blog's prompts are not at {BLOG}")
    model = meminject.load_model(args.model)
    neutral = read_prompt_lines(HERE / "neutral_prompts.txt")
    results = []
    for edit, prompt, target, attn_layer, mlp_layer in EDITS:
        positives = read_prompt_lines(BLOG / f"{edit}_positives.txt")
        negatives = read_prompt_lines(BLOG / f"{edit}_negatives.txt")
        for site, blog_layer in (("attn_z", attn_layer), ("mlp_post", mlp_layer)):
            layer = scaled(blog_layer, model.dims.n_layers)
            started = time.perf_counter()
            entry = {"edit": edit, "site": site, "layer": layer, "prompt": prompt}
            try:
                learned = learn(model, prompt, target, layer=layer, site=site, max_steps=3)
            except MeminjectError as exc:
                entry["error"] = str(exc)
                results.append(entry)
                print(f"{edit} {site} L{layer}: {exc}")
                continue
            choice = search_boundary(
                model, learned, [p.text for p in positives], [p.text for p in negatives]
            )
            with tempfile.TemporaryDirectory() as tmp:
                toml, _ = write_learned(
                    Path(tmp) / "edit.toml",
                    learned,
                    model,
                    name=f"{edit}-{site}",
                    boundary=choice.boundary,
                    hardness=3.0,
                )
                report = evaluate_edit(
                    model,
                    [toml],
                    target=target,
                    prompts={
                        "edit": [prompt],
                        "positive": positives,
                        "negative": negatives,
                        "neutral": neutral,
                    },
                    tokens=args.tokens,
                )
            entry.update(
                alpha=learned.alpha,
                steps=learned.steps,
                boundary=choice.boundary,
                p_before=learned.prob_before,
                p_after=learned.prob_after,
                seconds=round(time.perf_counter() - started, 1),
                **report.to_json(),
            )
            results.append(entry)
            m = report.metrics
            print(
                f"{edit} {site} L{layer}: α {learned.alpha:.3g}, b {choice.boundary:g}; "
                f"reliability {m['reliability']:.0%}, generalization {m['generalization']:.0%}, "
                f"specificity {m['specificity']:.0%}, neutral KL {m['neutral_kl_mean']:.3g} "
                f"({entry['seconds']} s)"
            )
    stem.parent.mkdir(exist_ok=True)
    for entry in results:
        for row in entry.get("prompts", ()):
            without_blog_text(row)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(render(args.model, results), encoding="utf-8")
    print(f"wrote {stem}.md and .json")


def without_blog_text(row: dict) -> dict:
    """The blog's prompt files stay outside the repository: a row read from one keeps
    its ``file:line``, not its text (the model's continuations are ours to keep)."""
    where = row.get("where") or ""
    if where and Path(where.rsplit(":", 1)[0]).resolve().parent == BLOG.resolve():
        row["where"] = f"{Path(where).name}"
        row["prompt"] = None
    return row


def metrics(entry: dict) -> dict:
    """The metrics of a saved entry, recomputed from its prompts (so a renderer newer
    than the run reports every current metric)."""
    from meminject.evaluate import EditReport, PromptResult

    report = EditReport(entry["target"], entry["target_token"])
    report.rows = [PromptResult(**p) for p in entry["prompts"]]
    return report.metrics


def render(model: str, results: list[dict]) -> str:
    lines = [f"# The blog's edits on {model}\n", "Generated by `experiments/blog_edits.py`.\n"]
    lines += [
        "| edit | site | layer | α | boundary | reliability | generalization | specificity "
        "| negatives' continuations kept | neutral top-1 kept | neutral KL mean / max (nats) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['edit']} | {r['site']} | {r['layer']} | failed: {r['error']} |")
            continue
        m = metrics(r)
        lines.append(
            f"| {r['edit']} | `{r['site']}` | {r['layer']} | {r['alpha']:.3g} | "
            f"{r['boundary']:g} | {m['reliability']:.0%} | {m['generalization']:.0%} "
            f"({m['counts']['positive']}) | {m['specificity']:.0%} ({m['counts']['negative']}) | "
            f"{m['negative_continuations_kept']:.0%} | "
            f"{m['neutral_top1_kept']:.0%} | "
            f"{m['neutral_kl_mean']:.3g} / {m['neutral_kl_max']:.3g} |"
        )
    for r in results:
        if "error" in r:
            continue
        lines += [
            "",
            f"## {r['edit']}, `{r['site']}`, layer {r['layer']}",
            "",
            "| kind | ok | prompt | original continuation | edited continuation |",
            "| --- | --- | --- | --- | --- |",
        ]
        for p in r["prompts"]:
            shown = p["prompt"] if p["prompt"] is not None else f"`{p['where']}`"
            cells = [p["kind"], "yes" if p["ok"] else "**no**", shown]
            cells += [repr(p["continuation_before"]), repr(p["continuation_after"])]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
