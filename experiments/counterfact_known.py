"""Which edits of the CounterFact-schema set does each unedited model know?

For every record of ``experiments/data/counterfact_meminject.json`` and every model, this
scores the true and the new target (whole targets, teacher-forced, as
``meminject evaluate --counterfact`` scores them; and the first token's rank) on the
rewrite prompt, the paraphrases and the neighbourhood prompts. A model *knows* a record
when, on the rewrite prompt, p(true) > p(new), and on most of its neighbourhood prompts
(more than half) p(true) > p(new) as well (otherwise the neighbourhood score has no
baseline to keep). The records every model knows are written to
``experiments/data/counterfact_meminject_known.json`` (the benchmark's set; same schema).

    python experiments/counterfact_known.py --models smollm2-135m,gemma3-270m

Writes ``experiments/results/counterfact_known.json`` (every score) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SET = HERE / "data" / "counterfact_meminject.json"
KNOWN = HERE / "data" / "counterfact_meminject_known.json"
STEM = HERE / "results" / "counterfact_known"


def score(model: Any, prompt: str, target_ids: list[int]) -> dict[str, Any]:
    """Summed log-probability of the whole target after ``prompt`` (teacher-forced), and the
    first token's probability and rank (0: top-1) among the vocabulary."""
    import torch

    prompt_ids = model.check_prompt_ids(model.tokenize(prompt, model.prepend_bos))
    ids = torch.tensor([prompt_ids + target_ids[:-1]], device=model.device)
    with torch.no_grad():
        logp = model.bridge(ids)[0].double().log_softmax(-1)
    rows = logp[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(target_ids)]
    first = rows[0]
    token = target_ids[0]
    return {
        "logp": float(sum(float(rows[i, t]) for i, t in enumerate(target_ids))),
        "p_first": float(first[token].exp()),
        "rank_first": int((first > first[token]).sum()),
    }


def check(model: Any, records: list[Any]) -> list[dict[str, Any]]:
    out = []
    for record in records:
        new_ids = model.continuation_ids(record.target_new)
        true_ids = model.continuation_ids(record.target_true)
        prompts = []
        for kind, texts in (
            ("rewrite", (record.rewrite_prompt,)),
            ("paraphrase", record.paraphrase_prompts),
            ("neighborhood", record.neighborhood_prompts),
        ):
            for text in texts:
                t, n = score(model, text, true_ids), score(model, text, new_ids)
                prompts.append(
                    {"kind": kind, "prompt": text, "true": t, "new": n,
                     "true_above_new": t["logp"] > n["logp"]}
                )  # fmt: skip
        rewrite = prompts[0]
        neighbours = [p for p in prompts if p["kind"] == "neighborhood"]
        paraphrases = [p for p in prompts if p["kind"] == "paraphrase"]
        known_neighbours = sum(p["true_above_new"] for p in neighbours)
        out.append(
            {
                "case_id": record.case_id,
                "subject": record.subject,
                "target_true": record.target_true,
                "target_new": record.target_new,
                "rewrite_true_above_new": rewrite["true_above_new"],
                "rewrite_true_top1": rewrite["true"]["rank_first"] == 0,
                "rewrite_true_rank": rewrite["true"]["rank_first"],
                "paraphrases_true_above_new": sum(p["true_above_new"] for p in paraphrases),
                "neighbours_true_above_new": known_neighbours,
                "neighbours": len(neighbours),
                "known": rewrite["true_above_new"] and 2 * known_neighbours > len(neighbours),
                "prompts": prompts,
            }
        )
    return out


def main() -> None:
    import meminject
    from meminject.evaluate import read_counterfact

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--set", default=str(SET), help="The CounterFact-schema file to check.")
    parser.add_argument("--out", default=str(STEM), help="Result stem (.json and .md).")
    parser.add_argument("--known-out", default=str(KNOWN), help="Where the kept set goes.")
    args = parser.parse_args()
    records = read_counterfact(args.set)
    results: dict[str, Any] = {"set": Path(args.set).name, "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        started = time.perf_counter()
        model = meminject.load_model(name, bridge=True)
        rows = check(model, records)
        results["models"][name] = {
            "seconds": round(time.perf_counter() - started, 1),
            "known": sum(r["known"] for r in rows),
            "records": rows,
        }
        print(f"{name}: knows {sum(r['known'] for r in rows)} of {len(rows)}", flush=True)
    known_by_all = [
        r.case_id
        for i, r in enumerate(records)
        if all(m["records"][i]["known"] for m in results["models"].values())
    ]
    results["known_by_all"] = known_by_all
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    stem.with_suffix(".md").write_text(render(results, len(records)), encoding="utf-8")
    source = json.loads(Path(args.set).read_text(encoding="utf-8"))
    kept = [item for item, r in zip(source, records, strict=True) if r.case_id in known_by_all]
    Path(args.known_out).write_text(
        json.dumps(kept, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"known by every model: {len(kept)} of {len(records)}; wrote {args.known_out}")


def render(results: dict[str, Any], total: int) -> str:
    models = list(results["models"])
    lines = [
        "# Which edits the unedited models know\n",
        "Generated by `experiments/counterfact_known.py` from "
        f"`experiments/data/{results['set']}`. A model knows a record when p(true) > p(new) "
        "on the rewrite prompt (whole targets, teacher-forced) and on more than half of its "
        "neighbourhood prompts.\n",
        "| model | known | rewrite: true above new | rewrite: true top-1 (first token) "
        "| paraphrases: true above new | neighbours: true above new | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in models:
        rows = results["models"][name]["records"]
        para = sum(r["paraphrases_true_above_new"] for r in rows)
        n_para = sum(1 for r in rows for p in r["prompts"] if p["kind"] == "paraphrase")
        neigh = sum(r["neighbours_true_above_new"] for r in rows)
        n_neigh = sum(r["neighbours"] for r in rows)
        lines.append(
            f"| {name} | {results['models'][name]['known']} of {total} | "
            f"{sum(r['rewrite_true_above_new'] for r in rows)} | "
            f"{sum(r['rewrite_true_top1'] for r in rows)} | {para} of {n_para} | "
            f"{neigh} of {n_neigh} | {results['models'][name]['seconds']} |"
        )
    lines.append(f"\nKnown by every model: **{len(results['known_by_all'])} of {total}**.\n")
    head = "| case | subject | true → new | " + " | ".join(
        f"{m}: rank of true / p(true) / neighbours" for m in models
    )
    lines += ["", head + " |", "| ---: | --- | --- |" + " --- |" * len(models)]
    for i, row in enumerate(results["models"][models[0]]["records"]):
        cells = [str(row["case_id"]), row["subject"], f"{row['target_true']} → {row['target_new']}"]
        for m in models:
            r = results["models"][m]["records"][i]
            t = r["prompts"][0]["true"]
            mark = "" if r["known"] else " **not known**"
            cells.append(
                f"{r['rewrite_true_rank']} / {t['p_first']:.2f} / "
                f"{r['neighbours_true_above_new']} of {r['neighbours']}{mark}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
