"""The multi-edit benchmark: one memory per edit of the CounterFact-schema set, scored
alone (sequential editing: each edit with only its own memory) and together (batched
editing: the first 1, 10 and 40 memories in one bank, scored on those edits), against
the unedited model.

Each memory is learned as ``meminject learn`` learns it (:func:`meminject.learn.fit_and_write`:
the key at the rewrite prompt's last token, α searched, the written file run through
generate's path and required to put the new target ``--margin`` nats above the runner-up;
teacher-forced over every token when the new target has more than one). No paraphrase or
neighbourhood prompt is shown to learn: the gate keeps its default parameter. The same
key and delta are written once per gate (``--gates``), so the gates are compared on
identical memories. Scores are the ones ``meminject evaluate --counterfact`` reports
(:func:`meminject.evaluate.evaluate_counterfact`: efficacy p(new) > p(true) and every new
token top-1, paraphrase p(new) > p(true), neighbourhood score p(true) > p(new),
locality = the neighbours' top-1 next token kept; each record's prompts averaged, then
the records), computed here with batched forward passes (right padding; checked against
``evaluate_counterfact`` on the first edit of every run, ``check`` in the results).

    python experiments/multi_edit.py learn --model smollm2-135m
    python experiments/multi_edit.py score --model smollm2-135m

``learn`` writes the memories (resumable) under ``--memories`` (default
``~/.cache/meminject/multi_edit/<model>``); ``score`` writes
``experiments/results/multi_edit_<model>.json`` and ``.md`` (numbers only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SET = HERE / "data" / "counterfact_meminject_known.json"
#: The site and layer per model (the blog's attention layer, GPT-2's 9 of 12, scaled).
SITES = {"smollm2-135m": ("attn_z", 22), "gemma3-270m": ("attn_z", 14), "toyworld": ("attn_out", 1)}
BANKS = (1, 10, 40)


def memory_dir(args: Any) -> Path:
    if args.memories:
        return Path(args.memories)
    return Path.home() / ".cache" / "meminject" / "multi_edit" / args.model


def learn_all(model: Any, records: list[Any], folder: Path, gates: list[str], args: Any) -> None:
    """One memory per record and gate in ``folder`` (``case-<id>-<gate>.toml``); records
    already learned are skipped; ``learn.json`` keeps α, margin and seconds."""
    from meminject.errors import MeminjectError
    from meminject.learn import fit_and_write, score_file, write_learned
    from meminject.schema import GATES

    site, layer = (args.site, args.layer) if args.site else SITES[args.model]
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "learn.json"
    log = json.loads(log_path.read_text(encoding="utf-8")) if log_path.is_file() else {}
    for record in records:
        if record.case_id in log:
            continue
        started = time.perf_counter()
        multi = len(model.continuation_ids(record.target_new)) > 1
        entry: dict[str, Any] = {"site": site, "layer": layer, "teacher_force": multi}
        try:
            fitted = fit_and_write(
                model,
                record.rewrite_prompt,
                record.target_new,
                folder / f"case-{record.case_id}-{gates[0]}.toml",
                layer=layer,
                site=site,
                name=f"case-{record.case_id}",
                max_steps=3,
                teacher_force=multi,
                margin=args.margin,
                gate=gates[0],
                force=True,
            )
        except MeminjectError as exc:
            entry["error"] = str(exc)
        else:
            learned = fitted.learned
            entry.update(alpha=learned.alpha, steps=learned.steps, raised=fitted.raised)
            entry[gates[0]] = {"margin": fitted.score.margin, "parameter": fitted.boundary}
            for gate in gates[1:]:
                # The same key and delta with another gate (its default parameter).
                path, _ = write_learned(
                    folder / f"case-{record.case_id}-{gate}.toml",
                    learned,
                    model,
                    name=f"case-{record.case_id}",
                    boundary=GATES[gate].default,
                    hardness=3.0,
                    gate=gate,
                    force=True,
                )
                score = score_file(
                    model, path, record.rewrite_prompt, learned.target_ids, teacher_force=multi
                )
                entry[gate] = {"margin": score.margin, "parameter": GATES[gate].default}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        log[record.case_id] = entry
        log_path.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
        print(f"case {record.case_id} {record.subject}: {entry}", flush=True)


# --- scoring ---------------------------------------------------------------------------


def batch_scores(
    model: Any, items: list[tuple[list[int], list[int]]], compiled: Any, chunk: int = 16
) -> list[tuple[float, bool, int]]:
    """For each (prompt ids, target ids): the target's summed log-probability after the
    prompt (teacher-forced), whether every target token is top-1, and the top-1 token
    after the prompt — as ``evaluate``'s ``_target_logp``, in right-padded batches (causal
    attention: the padding comes after every position read)."""
    import torch

    from meminject.engine import inject

    out = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        rows = [p + t[:-1] for p, t in part]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        with torch.no_grad(), inject(model, compiled):
            logits = model.bridge(ids.to(model.device))
        for i, (prompt_ids, target_ids) in enumerate(part):
            at = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target_ids))
            chosen = logits[i, at.to(logits.device)].double().log_softmax(-1)
            targets = torch.tensor(target_ids, device=chosen.device)
            logp = float(chosen.gather(1, targets[:, None]).sum())
            out.append((logp, bool((chosen.argmax(-1) == targets).all()), int(chosen[0].argmax())))
    return out


def prompt_items(model: Any, records: list[Any]) -> list[tuple[Any, str, str, list[int]]]:
    """(record, kind, prompt, prompt ids) for every prompt of ``records``."""
    items = []
    for r in records:
        for kind, prompts in (
            ("rewrite", (r.rewrite_prompt,)),
            ("paraphrase", r.paraphrase_prompts),
            ("neighborhood", r.neighborhood_prompts),
        ):
            for p in prompts:
                items.append(
                    (r, kind, p, model.check_prompt_ids(model.tokenize(p, model.prepend_bos)))
                )
    return items


def scores_for(model: Any, records: list[Any], compiled: Any) -> dict[tuple[str, str], tuple]:
    """{(case_id, prompt): (logp new, logp true, new all top-1, top-1)}."""
    items = prompt_items(model, records)
    targets = {
        r.case_id: (model.continuation_ids(r.target_new), model.continuation_ids(r.target_true))
        for r in records
    }
    flat = []
    for r, _, _, ids in items:
        new_ids, true_ids = targets[r.case_id]
        flat += [(ids, new_ids), (ids, true_ids)]
    scored = batch_scores(model, flat, compiled)
    out = {}
    for n, (r, kind, p, _) in enumerate(items):
        (lp_new, acc, top), (lp_true, _, _) = scored[2 * n], scored[2 * n + 1]
        out[(r.case_id, p)] = (lp_new, lp_true, acc, top, kind)
    return out


def metrics(records: list[Any], before: dict, after: dict) -> dict[str, Any]:
    """``evaluate_counterfact``'s metrics from precomputed scores (its own aggregation)."""
    from meminject.evaluate import add_prompt_shares, mean_over_records

    per_record = []
    for r in records:
        shares: dict[str, list[float]] = {}
        for (case_id, p), b in before.items():
            if case_id == r.case_id:
                add_prompt_shares(shares, b[4], b[:4], after[(case_id, p)][:4])
        per_record.append({k: sum(v) / len(v) for k, v in shares.items()})
    return mean_over_records(per_record)


def score_all(model: Any, records: list[Any], folder: Path, gates: list[str]) -> dict[str, Any]:
    from meminject.engine import compile_memories
    from meminject.evaluate import evaluate_counterfact
    from meminject.loading import load_memories

    log = json.loads((folder / "learn.json").read_text(encoding="utf-8"))
    learned = [r for r in records if "error" not in log.get(r.case_id, {"error": "not learned"})]
    before = scores_for(model, records, None)
    learned_ids = {r.case_id for r in learned}
    before_learned = {k: v for k, v in before.items() if k[0] in learned_ids}
    result: dict[str, Any] = {
        "learned": len(learned),
        "failed": {
            r.case_id: log[r.case_id]["error"]
            for r in records
            if r not in learned and r.case_id in log
        },
        "learn": log,
        "baseline": metrics(learned, before_learned, before_learned),
        "gates": {},
    }
    for gate in gates:
        started = time.perf_counter()

        def bank(chosen: list[Any], gate: str = gate) -> Any:
            paths = [folder / f"case-{r.case_id}-{gate}.toml" for r in chosen]
            return compile_memories(model, load_memories(paths))

        per_gate: dict[str, Any] = {}
        # Sequential: each edit with its own memory only.
        seq_after: dict = {}
        for r in learned:
            seq_after.update(scores_for(model, [r], bank([r])))
        seq_before = {k: v for k, v in before.items() if k[0] in {r.case_id for r in learned}}
        per_gate["sequential"] = metrics(learned, seq_before, seq_after)
        # Batched: the first n memories in one bank, scored on those n edits.
        for n in BANKS:
            if n > len(learned):
                continue
            chosen = learned[:n]
            after = scores_for(model, chosen, bank(chosen))
            sub = {k: v for k, v in before.items() if k[0] in {r.case_id for r in chosen}}
            per_gate[f"batch_{n}"] = metrics(chosen, sub, after)
        # The check: the reader's own evaluation of the first edit agrees with ours.
        first = learned[0]
        theirs = evaluate_counterfact(model, bank([first]), [first])["metrics"]
        ours = metrics([first], {k: v for k, v in before.items() if k[0] == first.case_id},
                       scores_for(model, [first], bank([first])))  # fmt: skip
        per_gate["check"] = {
            "case_id": first.case_id,
            "agrees": all(abs(theirs[k] - ours[k]) < 1e-9 for k in theirs),
        }
        per_gate["seconds"] = round(time.perf_counter() - started, 1)
        result["gates"][gate] = per_gate
        print(f"{gate}: {json.dumps(per_gate)}", flush=True)
    return result


def fluency_all(
    model: Any, records: list[Any], folder: Path, gates: list[str], tokens: int
) -> dict[str, Any]:
    """ROME's fluency (n-gram entropy of ``tokens`` greedy tokens after each edit's rewrite
    prompt and paraphrases), unedited and, per gate, with each edit's memory alone and
    with the banks of 10 and 40 (each bank on its own edits' prompts) — the conditions
    ``score`` reports. The unedited continuations are made once and shared."""
    from meminject.engine import compile_memories
    from meminject.evaluate import add_fluency, mean_over_records
    from meminject.fluency import continuations, ngram_entropy
    from meminject.loading import load_memories

    log = json.loads((folder / "learn.json").read_text(encoding="utf-8"))
    learned = [r for r in records if "error" not in log.get(r.case_id, {"error": "not learned"})]
    bos = model.prepend_bos
    prompts = [p for r in learned for p in r.fluency_prompts]
    started = time.perf_counter()
    before = continuations(model, prompts, tokens=tokens, prepend_bos=bos)
    unedited = [{"case_id": r.case_id} for r in learned]
    offset = 0
    for r, entry in zip(learned, unedited, strict=True):
        mine = before[offset : offset + len(r.fluency_prompts)]
        offset += len(mine)
        entry["fluency_before"] = sum(ngram_entropy(t) for t in mine) / len(mine)
    result: dict[str, Any] = {
        "tokens": tokens,
        "prompts": len(prompts),
        "unedited": mean_over_records(unedited)["fluency_before"],
        "gates": {},
    }

    def bank(chosen: list[Any], gate: str) -> Any:
        paths = [folder / f"case-{r.case_id}-{gate}.toml" for r in chosen]
        return compile_memories(model, load_memories(paths))

    for gate in gates:
        per_gate: dict[str, Any] = {}
        per = [{"case_id": r.case_id} for r in learned]
        rows = add_fluency(
            model, learned, per, None, tokens, bos,
            memories_per_prompt=[bank([r], gate) for r in learned], before=before,
        )  # fmt: skip
        per_gate["sequential"] = before_after(per)
        per_gate["example"] = {k: rows[0][k] for k in ("prompt", "before", "after")}
        for n in BANKS[1:]:
            if n > len(learned):
                continue
            chosen = learned[:n]
            width = sum(len(r.fluency_prompts) for r in chosen)
            per = [{"case_id": r.case_id} for r in chosen]
            add_fluency(model, chosen, per, bank(chosen, gate), tokens, bos, before=before[:width])
            per_gate[f"batch_{n}"] = before_after(per)
        result["gates"][gate] = per_gate
        print(f"fluency {gate}: {json.dumps(per_gate)}", flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def before_after(per_record: list[dict[str, Any]]) -> dict[str, float]:
    """The fluency means over records, as the results file keeps them."""
    from meminject.evaluate import mean_over_records

    m = mean_over_records(per_record)
    return {"before": m["fluency_before"], "after": m["fluency_after"], "edits": m["records"]}


def key_cosines(records: list[Any], folder: Path, threshold: float = 0.9) -> dict[str, Any]:
    """Cosines between the learned keys (flattened, as the gates see them): among edits
    of the same prompt template and among edits of different templates, and how many
    pairs lie within ``threshold`` (the cosine gate's default)."""
    import torch
    from safetensors.torch import load_file

    keys, templates = [], []
    for r in records:
        found = sorted(folder.glob(f"case-{r.case_id}.*.safetensors"))
        if found:
            keys.append(load_file(found[0])["key"].flatten().double())
            templates.append(r.prompt)
    k = torch.stack(keys)
    k = k / k.norm(dim=1, keepdim=True)
    cos = k @ k.T
    same = torch.tensor([[a == b for b in templates] for a in templates])
    off = ~torch.eye(len(keys), dtype=torch.bool)
    out: dict[str, Any] = {"threshold": threshold}
    for name, mask in (("same_template", same & off), ("other_template", ~same)):
        values = cos[mask]
        if not len(values):
            out[name] = {"pairs": 0, "mean": None, "min": None, "max": None}
            out[name]["above_threshold"] = 0
            continue
        out[name] = {
            "pairs": int(mask.sum()) // 2,
            "mean": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
            "above_threshold": int((values > threshold).sum()) // 2,
        }
    return out


ROWS = (
    ("rewrite", "efficacy p(new) > p(true)"),
    ("rewrite_acc", "efficacy: new target top-1 (teacher-forced)"),
    ("paraphrase", "paraphrase p(new) > p(true)"),
    ("neighborhood_score", "neighbourhood score p(true) > p(new)"),
)


def render(model: str, result: dict[str, Any]) -> str:
    base = result["baseline"]
    gates = result["gates"]
    lines = [
        f"# Multi-edit benchmark on {model}\n",
        "Generated by `experiments/multi_edit.py` from `experiments/data/"
        f"{result['set']}` ({result['records']} edits; {result['learned']} learned, "
        f"site `{result['site']}`, layer {result['layer']}, margin {result['margin']} nats). "
        "Shares over edits (each edit's prompts averaged first). Sequential: each edit "
        "with only its own memory; batch n: the first n memories in one bank, scored on "
        "those n edits. The unedited column is over all learned edits.\n",
    ]
    for gate, g in gates.items():
        cols = ["sequential"] + [f"batch_{n}" for n in BANKS if f"batch_{n}" in g]
        lines += [
            f"## {gate} gate (parameter {result['parameters'][gate]})\n",
            "| metric | unedited | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
            "| --- | ---: |" + " ---: |" * len(cols),
        ]
        for key, label in ROWS:
            cells = [f"{g[c][f'{key}_after']:.1%}" for c in cols]
            lines.append(f"| {label} | {base[f'{key}_before']:.1%} | " + " | ".join(cells) + " |")
        cells = [f"{g[c]['locality']:.1%}" for c in cols]
        lines.append("| locality (neighbours' top-1 kept) | 100% | " + " | ".join(cells) + " |")
        fluency = result.get("fluency", {})
        if gate in fluency.get("gates", {}):
            f = fluency["gates"][gate]
            cells = [
                "–"
                if c not in f
                else f"{f[c]['after']:.3f}"
                + (
                    f" (unedited {f[c]['before']:.3f})"
                    if abs(f[c]["before"] - fluency["unedited"]) > 1e-9
                    else ""
                )
                for c in cols
            ]
            lines.append(
                f"| fluency (n-gram entropy, bits) | {fluency['unedited']:.3f} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append(
            "| edits scored | "
            + f"{base['records']} | "
            + " | ".join(str(g[c]["records"]) for c in cols)
            + " |"
        )
        lines.append(
            f"\nReader check (case {g['check']['case_id']}: `evaluate_counterfact` gives the "
            f"same metrics): {'yes' if g['check']['agrees'] else '**no**'}. Scoring took "
            f"{g['seconds']} s.\n"
        )
    if result.get("fluency"):
        f = result["fluency"]
        lines.append(
            f"Fluency: ROME's n-gram entropy (bits) of {f['tokens']} greedy tokens after each "
            f"edit's rewrite prompt and paraphrases ({f['prompts']} prompts), averaged per "
            "edit, then over edits; each column's edits are scored on their own prompts, and "
            f"the unedited column on all of them ({f['seconds']:.0f} s).\n"
        )
    if result.get("key_cosine", {}).get("other_template", {}).get("pairs"):
        kc = result["key_cosine"]
        lines.append(
            f"Cosine between learned keys (flattened, as the gates compare them): same prompt "
            f"template {kc['same_template']['mean']:.3f} mean, "
            f"{kc['same_template']['above_threshold']} of {kc['same_template']['pairs']} "
            f"pairs above {kc['threshold']}; different templates "
            f"{kc['other_template']['mean']:.3f} mean, max "
            f"{kc['other_template']['max']:.3f}, {kc['other_template']['above_threshold']} of "
            f"{kc['other_template']['pairs']} pairs above {kc['threshold']}.\n"
        )
    scored = result.get("case_ids") or list(result["learn"])
    seconds = [result["learn"][c]["seconds"] for c in scored if c in result["learn"]]
    lines.append(
        f"Learning: {result['learned']} memories, {sum(seconds):.0f} s in all "
        f"(median {sorted(seconds)[len(seconds) // 2]:.0f} s); failed: "
        f"{', '.join(f'{k} ({v})' for k, v in result['failed'].items()) or 'none'}. "
        f"Scoring (both gates, the unedited baseline): {result['score_seconds']:.0f} s. "
        "CPU (2 shared cores), times include other jobs' load.\n"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    import meminject
    from meminject.evaluate import read_counterfact

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("learn", "score", "both", "keys", "fluency"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--set", default=str(SET))
    parser.add_argument("--limit", type=int, default=40, help="The first N edits of the set.")
    parser.add_argument("--gates", default="cosine,projection")
    parser.add_argument("--site", default=None)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--memories", default=None)
    parser.add_argument(
        "--fluency-tokens", type=int, default=32, help="Greedy tokens per prompt (fluency)."
    )
    parser.add_argument(
        "--render-only", action="store_true", help="Rewrite the .md from the saved .json."
    )
    parser.add_argument(
        "--out", default=None, help="Result stem (default experiments/results/multi_edit_<model>)."
    )
    args = parser.parse_args()
    gates = [g.strip() for g in args.gates.split(",") if g.strip()]
    stem = Path(args.out) if args.out else HERE / "results" / f"multi_edit_{args.model}"
    if args.render_only:
        saved = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        stem.with_suffix(".md").write_text(render(args.model, saved), encoding="utf-8")
        return
    records = read_counterfact(args.set)[: args.limit]
    folder = memory_dir(args)
    if args.phase == "keys":  # add the keys' cosines to a saved run
        saved = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        saved["key_cosine"] = key_cosines(records, folder)
        stem.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
        stem.with_suffix(".md").write_text(render(args.model, saved), encoding="utf-8")
        return
    model = meminject.load_model(args.model, bridge=True)
    if args.phase == "fluency":  # add fluency to a saved run
        saved = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        scored = [r for r in records if r.case_id in saved.get("case_ids", [r.case_id])]
        saved["fluency"] = fluency_all(model, scored, folder, gates, args.fluency_tokens)
        stem.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
        stem.with_suffix(".md").write_text(render(args.model, saved), encoding="utf-8")
        print(f"wrote {stem}.md and .json")
        return
    started = time.perf_counter()
    if args.phase in ("learn", "both"):
        learn_all(model, records, folder, gates, args)
    if args.phase in ("score", "both"):
        site, layer = (args.site, args.layer) if args.site else SITES[args.model]
        result = score_all(model, records, folder, gates)
        result["key_cosine"] = key_cosines(records, folder)
        from meminject.schema import GATES

        result.update(
            set=Path(args.set).name, records=len(records), site=site, layer=layer,
            case_ids=[r.case_id for r in records],
            margin=args.margin, parameters={g: GATES[g].default for g in gates},
            score_seconds=round(time.perf_counter() - started, 1),
        )  # fmt: skip
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        stem.with_suffix(".md").write_text(render(args.model, result), encoding="utf-8")
        print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
