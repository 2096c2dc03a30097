"""Edit metrics for a memory set, in the vocabulary of model editing.

A memory that edits a fact ("the capital of Nepal is … Kathmandu", or the deliberately
wrong "Tokyo is in … Kathmandu") is judged on four kinds of prompts:

* **reliability** — the prompts it was made on: does the next token become the target?
* **generalization** — positives, paraphrases that should also give the target; a
  positive that is one of the edit prompts (the same text, whitespace aside) is left out
  and reported as left out, since it measures reliability, not generalization;
* **specificity** (locality) — negatives, near misses that must *not* give the target;
* **neutral** — unrelated prompts whose next-token distribution must not move at all,
  measured by KL(before ‖ after) in nats and by whether the top-1 token stayed.

Specificity and the neutral measures look at the next token after the prompt; the share
of negative and neutral prompts whose whole continuation is unchanged is reported too,
because a gate that stays shut at the prompt's last token can still open on a later,
generated one.

Every prompt is also continued greedily for a few tokens with and without the memories,
the way the local-memory blog shows its edits. Nothing here is specific to gated
memories: an ``add`` memory is evaluated the same way (and, being always on, usually
moves the neutral prompts — which is the point of measuring them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError
from meminject.fluency import FluencyRow, mean_entropies
from meminject.model_handle import continuation

if TYPE_CHECKING:
    from meminject.engine import MemoriesArg
    from meminject.model_handle import LoadedModel

KINDS = ("edit", "positive", "negative", "neutral")


@dataclass(frozen=True)
class PromptResult:
    """One prompt, before and after the memories."""

    kind: str
    prompt: str
    where: str | None  # file:line when the prompt came from a file
    top1_before: str
    top1_after: str
    p_target_before: float
    p_target_after: float
    kl: float  # KL(before ‖ after) of the next-token distribution, nats
    continuation_before: str
    continuation_after: str
    #: edit/positive: the target is top-1 after; negative: it is not; neutral: top-1 kept.
    ok: bool


@dataclass
class EditReport:
    target: str
    target_token: str
    rows: list[PromptResult] = field(default_factory=list)
    #: Positives left out of generalization because they are an edit prompt (their
    #: ``file:line``, or the text when they came from no file).
    excluded_positives: list[str] = field(default_factory=list)
    #: Each memory alone on the neutral prompts: name → {"kl_mean", "kl_max", "top1_kept"}.
    neutral_per_memory: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Longer greedy continuations of every prompt, before and after, with ROME's n-gram
    #: entropy (:mod:`meminject.fluency`), one per row of ``rows``, in their order; empty
    #: unless fluency was asked for.
    fluency: list[FluencyRow] = field(default_factory=list)

    def of(self, kind: str) -> list[PromptResult]:
        return [r for r in self.rows if r.kind == kind]

    @property
    def metrics(self) -> dict[str, Any]:
        """Shares of prompts that behave (None for a kind with no prompts), and the
        neutral prompts' KL."""

        def share(kind: str) -> float | None:
            rows = self.of(kind)
            return sum(r.ok for r in rows) / len(rows) if rows else None

        def kept(kind: str) -> float | None:
            # The next token is not the whole story: a gate can stay shut at the prompt's
            # end and open on a later position, changing what follows.
            rows = self.of(kind)
            if not rows:
                return None
            return sum(r.continuation_before == r.continuation_after for r in rows) / len(rows)

        neutral = self.of("neutral")
        kls = [r.kl for r in neutral]
        fluency: dict[str, float | None] = {"fluency_before": None, "fluency_after": None}
        if self.fluency:
            fluency.update(mean_entropies(self.fluency))
        return {
            "reliability": share("edit"),
            "generalization": share("positive"),
            "specificity": share("negative"),
            "neutral_top1_kept": share("neutral"),
            "neutral_kl_mean": sum(kls) / len(kls) if kls else None,
            "neutral_kl_max": max(kls) if kls else None,
            "negative_continuations_kept": kept("negative"),
            "neutral_continuations_kept": kept("neutral"),
            "counts": {kind: len(self.of(kind)) for kind in KINDS},
            "positives_excluded_as_edit_prompts": len(self.excluded_positives),
            **fluency,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "target_token": self.target_token,
            "metrics": self.metrics,
            "excluded_positives": list(self.excluded_positives),
            "neutral_per_memory": dict(self.neutral_per_memory),
            "prompts": [asdict(r) for r in self.rows],
            "fluency": [
                {"kind": r.kind, **asdict(f)}
                for r, f in zip(self.rows if self.fluency else [], self.fluency, strict=True)
            ],
        }


def prompt_key(text: str) -> str:
    """A prompt as compared with the edit prompts: whitespace runs made one space."""
    return " ".join(text.split())


def neutral_per_memory(
    model: LoadedModel,
    memory_set: Any,
    prompts: Sequence[Any],
    *,
    allow_outside_paths: bool = False,
) -> dict[str, dict[str, float]]:
    """Each memory of ``memory_set`` alone on the neutral ``prompts``: the mean and largest
    KL(before ‖ after) of the next-token distribution (nats, float64) and the share of
    prompts whose top-1 token is kept. A memory that leaks shows here even when others in
    its set are quiet."""
    import torch

    from meminject.engine import compile_memories, inject

    items = _prompt_items(prompts)
    if not items:
        return {}
    befores = []
    rows = []
    for text, _ in items:
        ids = torch.tensor(
            [
                model.check_prompt_ids(
                    model.tokenize(text, model.prepend_bos_for(memory_set.model_info()))
                )
            ],
            device=model.device,
        )
        rows.append(ids)
        with torch.no_grad():
            befores.append(model.bridge(ids)[0, -1].double().log_softmax(-1))
    out: dict[str, dict[str, float]] = {}
    for entry in memory_set.entries:
        alone = memory_set.subset([entry.name])
        compiled = compile_memories(model, alone, allow_outside_paths=allow_outside_paths)
        kls, kept = [], 0
        for ids, before in zip(rows, befores, strict=True):
            with torch.no_grad(), inject(model, compiled):
                after = model.bridge(ids)[0, -1].double().log_softmax(-1)
            kls.append(float((before.exp() * (before - after)).sum().clamp_min(0.0)))
            kept += int(after.argmax()) == int(before.argmax())
        out[entry.name] = {
            "kl_mean": sum(kls) / len(kls),
            "kl_max": max(kls),
            "top1_kept": kept / len(kls),
        }
    return out


def _prompt_items(prompts: Sequence[Any]) -> list[tuple[str, str | None]]:
    """Prompts as (text, where): plain strings, or the learn module's PromptLines."""
    items: list[tuple[str, str | None]] = []
    for p in prompts:
        if isinstance(p, str):
            items.append((p, None))
        else:
            items.append((str(p.text), str(p.where)))
    return items


def evaluate_edit(
    model: LoadedModel,
    memories: MemoriesArg,
    *,
    target: str,
    prompts: Mapping[str, Sequence[Any]],
    tokens: int = 5,
    fluency_tokens: int = 0,
) -> EditReport:
    """Run every prompt of ``prompts`` (keys among ``edit``, ``positive``, ``negative``,
    ``neutral``) with and without ``memories`` and report the edit metrics.

    ``target`` is the text the edit should produce after the prompts, by the rule of
    ``learn``'s ``--target`` (``LoadedModel.continuation_ids``: a space is put before it
    unless it starts with whitespace); its first token is what "gives the target"
    means. ``tokens`` greedy tokens are generated for each prompt both ways; with
    ``fluency_tokens`` > 0, every prompt is also continued that far both ways and scored
    by ROME's n-gram entropy (the fluency metrics)."""
    import torch

    from meminject.engine import CompiledHook, as_memory_set, compile_memories, inject
    from meminject.generation import generate

    unknown = sorted(set(prompts) - set(KINDS))
    if unknown:
        raise BadInputError(f"unknown prompt kind '{unknown[0]}'; kinds: {', '.join(KINDS)}")
    if not any(prompts.get(kind) for kind in KINDS):
        raise BadInputError("evaluate needs prompts: --prompt, --positive, --negative or --neutral")
    if tokens < 0:
        raise BadInputError("--max-new-tokens must be >= 0")
    if fluency_tokens < 0:
        raise BadInputError("--fluency-tokens must be >= 0")
    target_ids = model.continuation_ids(target)
    target_id = target_ids[0]
    if isinstance(memories, list) and all(isinstance(m, CompiledHook) for m in memories):
        compiled, bos = list(memories), model.prepend_bos
    else:
        memory_set = as_memory_set(memories)  # type: ignore[arg-type]
        compiled = compile_memories(model, memory_set)
        bos = model.prepend_bos_for(memory_set.model_info())  # as generation decides it
    report = EditReport(continuation(target), model.token_str(target_id))
    edit_texts = {prompt_key(text) for text, _ in _prompt_items(prompts.get("edit", ()))}
    for kind in KINDS:
        for text, where in _prompt_items(prompts.get(kind, ())):
            if kind == "positive" and prompt_key(text) in edit_texts:
                report.excluded_positives.append(where or text)
                continue
            if not text.strip():
                raise BadInputError(f"{where or kind + ' prompt'}: the prompt is empty")
            ids = torch.tensor(
                [model.check_prompt_ids(model.tokenize(text, bos))], device=model.device
            )
            with torch.no_grad():
                before = model.bridge(ids)[0, -1].double().log_softmax(-1)
                with inject(model, compiled):
                    after = model.bridge(ids)[0, -1].double().log_softmax(-1)
            kl = float((before.exp() * (before - after)).sum().clamp_min(0.0))
            top_before, top_after = int(before.argmax()), int(after.argmax())
            if kind in ("edit", "positive"):
                ok = top_after == target_id
            elif kind == "negative":
                ok = top_after != target_id
            else:
                ok = top_after == top_before
            plain = edited = None
            if tokens:
                plain = generate(model, text, max_new_tokens=tokens, prepend_bos=bos)
                edited = generate(model, text, compiled, max_new_tokens=tokens, prepend_bos=bos)
            report.rows.append(
                PromptResult(
                    kind=kind,
                    prompt=text,
                    where=where,
                    top1_before=model.token_str(top_before),
                    top1_after=model.token_str(top_after),
                    p_target_before=float(before[target_id].exp()),
                    p_target_after=float(after[target_id].exp()),
                    kl=kl,
                    continuation_before=plain.completion if plain is not None else "",
                    continuation_after=edited.completion if edited is not None else "",
                    ok=ok,
                )
            )
    if fluency_tokens:
        from meminject.fluency import measure_fluency

        rows = measure_fluency(
            model, [r.prompt for r in report.rows], compiled, tokens=fluency_tokens,
            prepend_bos=bos,
        )  # fmt: skip
        report.fluency = rows
    return report


# --- CounterFact's schema -------------------------------------------------------------

#: Largest CounterFact-style JSON file read, in bytes (the full CounterFact is ~40 MB).
MAX_COUNTERFACT_BYTES = 256 << 20


@dataclass(frozen=True)
class CounterfactRecord:
    """One requested rewrite in CounterFact's schema (Meng et al., ROME): the prompt (with
    ``{}`` for the subject), the subject, the new and the true target, paraphrases of the
    prompt, and neighbourhood prompts (other subjects whose true answer is
    ``target_true``)."""

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    #: CounterFact's prompts for measuring fluency; optional in the schema.
    generation_prompts: tuple[str, ...] = ()

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject)

    @property
    def fluency_prompts(self) -> tuple[str, ...]:
        """The record's ``generation_prompts``, or, when it has none, its rewrite prompt
        and paraphrases (where the edit should show, so where it can spoil the text)."""
        return self.generation_prompts or (self.rewrite_prompt, *self.paraphrase_prompts)


def read_counterfact(path: Any) -> list[CounterfactRecord]:
    """Records of a JSON file in CounterFact's schema: a list of objects with
    ``requested_rewrite`` (``prompt`` holding ``{}``, ``subject``, ``target_new`` and
    ``target_true``, each ``{"str": …}`` or a string), ``paraphrase_prompts`` and
    ``neighborhood_prompts`` (lists of strings); ``case_id`` and ``generation_prompts``
    are optional. The real
    CounterFact file reads as it is; a problem is one line naming the file, the record
    and the field."""
    import json
    from pathlib import Path

    from meminject.fsread import read_user_text

    path = Path(path)
    text = read_user_text(path, MAX_COUNTERFACT_BYTES, "CounterFact files")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise BadInputError(f"{path}: expected a non-empty list of CounterFact records")
    records = []
    for index, item in enumerate(data):
        where = f"{path}: record #{index + 1}"

        def bad(field_name: str, why: str, where: str = where) -> BadInputError:
            return BadInputError(f"{where}: field '{field_name}': {why}")

        if not isinstance(item, dict):
            raise BadInputError(f"{where}: must be an object")
        rewrite = item.get("requested_rewrite")
        if isinstance(rewrite, list) and len(rewrite) == 1:  # MQuAKE-style lists of one
            rewrite = rewrite[0]
        if not isinstance(rewrite, dict):
            raise bad("requested_rewrite", "missing or not an object")

        def text_of(key: str, rewrite: dict = rewrite) -> str:
            value = rewrite.get(key)
            if isinstance(value, dict):
                value = value.get("str")
            if not isinstance(value, str) or not value.strip():
                raise bad(f"requested_rewrite.{key}", "missing or not a non-empty string")
            return value

        prompt = text_of("prompt")
        if "{}" not in prompt:
            raise bad("requested_rewrite.prompt", "must hold '{}' where the subject goes")

        def prompts_of(key: str, item: dict = item) -> tuple[str, ...]:
            value = item.get(key, [])
            if not isinstance(value, list) or not all(
                isinstance(p, str) and p.strip() for p in value
            ):
                raise bad(key, "must be a list of non-empty strings")
            return tuple(value)

        records.append(
            CounterfactRecord(
                case_id=str(item.get("case_id", index)),
                prompt=prompt,
                subject=text_of("subject"),
                target_new=text_of("target_new"),
                target_true=text_of("target_true"),
                paraphrase_prompts=prompts_of("paraphrase_prompts"),
                neighborhood_prompts=prompts_of("neighborhood_prompts"),
                generation_prompts=prompts_of("generation_prompts"),
            )
        )
    return records


@dataclass(frozen=True)
class TargetScore:
    """A prompt's two answers, teacher-forced: the summed log-probabilities of every token
    of the new and of the true target, and whether greedy decoding would produce every
    token of the new target."""

    kind: str  # rewrite, paraphrase, neighborhood
    case_id: str
    prompt: str
    logp_new: float
    logp_true: float
    new_all_top1: bool
    top1_before: int
    top1_after: int


def _target_logp(
    model: LoadedModel, prompt_ids: list[int], target_ids: list[int], compiled: Any
) -> tuple[float, bool, int]:
    """(sum of log p of ``target_ids`` after the prompt, every target token top-1, top-1
    token after the prompt), with ``compiled`` injected (None: none)."""
    import torch

    from meminject.engine import inject

    ids = torch.tensor([prompt_ids + target_ids[:-1]], device=model.device)
    with torch.no_grad(), inject(model, compiled):
        logits = model.bridge(ids)[0].double().log_softmax(-1)
    rows = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target_ids))
    targets = torch.tensor(target_ids, device=logits.device)
    chosen = logits[rows.to(logits.device)]
    logp = float(chosen.gather(1, targets[:, None]).sum())
    all_top1 = bool((chosen.argmax(-1) == targets).all())
    return logp, all_top1, int(chosen[0].argmax())


def evaluate_counterfact(
    model: LoadedModel,
    memories: MemoriesArg,
    records: Sequence[CounterfactRecord],
    *,
    fluency_tokens: int = 0,
) -> dict[str, Any]:
    """The field's edit metrics over ``records`` with ``memories`` (one bank for all):

    * efficacy — on each rewrite prompt, p(new) > p(old) (whole targets, teacher-forced,
      as ROME scores them), and the new target's teacher-forced accuracy (every token
      top-1, EasyEdit's ``rewrite_acc``);
    * paraphrase — p(new) > p(old) on the paraphrase prompts;
    * neighbourhood score — p(true) > p(new) on the neighbourhood prompts (ROME's NS);
    * locality — the neighbourhood prompts' top-1 next token unchanged (EasyEdit);
    * fluency (with ``fluency_tokens`` > 0) — ROME's n-gram entropy of that many greedy
      tokens after each record's :attr:`~CounterfactRecord.fluency_prompts`;

    each also for the unedited model, as the baseline. Shares over records (each record's
    prompts averaged first, as ROME does), and the raw scores."""
    from meminject.engine import CompiledHook, as_memory_set, compile_memories

    if fluency_tokens < 0:
        raise BadInputError("--fluency-tokens must be >= 0")
    if isinstance(memories, list) and all(isinstance(m, CompiledHook) for m in memories):
        compiled, bos = list(memories), model.prepend_bos
    else:
        memory_set = as_memory_set(memories)  # type: ignore[arg-type]
        compiled = compile_memories(model, memory_set)
        bos = model.prepend_bos_for(memory_set.model_info())
    rows: list[dict[str, Any]] = []
    per_record: list[dict[str, Any]] = []
    for record in records:
        new_ids = model.continuation_ids(record.target_new, f"record {record.case_id}'s target_new")
        true_ids = model.continuation_ids(
            record.target_true, f"record {record.case_id}'s target_true"
        )
        shares: dict[str, list[float]] = {}
        for kind, prompts in (
            ("rewrite", (record.rewrite_prompt,)),
            ("paraphrase", record.paraphrase_prompts),
            ("neighborhood", record.neighborhood_prompts),
        ):
            for prompt in prompts:
                ids = model.check_prompt_ids(model.tokenize(prompt, bos))
                scores = {}
                for label, hooks in (("before", None), ("after", compiled)):
                    lp_new, acc, top = _target_logp(model, ids, new_ids, hooks)
                    lp_true, _, _ = _target_logp(model, ids, true_ids, hooks)
                    scores[label] = (lp_new, lp_true, acc, top)
                row: dict[str, Any] = {"case_id": record.case_id, "kind": kind, "prompt": prompt}
                for label, (lp_new, lp_true, acc, top) in scores.items():
                    row[label] = {
                        "logp_new": lp_new,
                        "logp_true": lp_true,
                        "new_all_top1": acc,
                        "top1": model.token_str(top),
                    }
                rows.append(row)
                add_prompt_shares(shares, kind, scores["before"], scores["after"])
        per_record.append(
            {"case_id": record.case_id, **{k: sum(v) / len(v) for k, v in shares.items()}}
        )
    result = {"metrics": mean_over_records(per_record), "records": per_record, "prompts": rows}
    if fluency_tokens:
        result["fluency"] = add_fluency(model, records, per_record, compiled, fluency_tokens, bos)
        result["metrics"] = mean_over_records(per_record)
    return result


def add_fluency(
    model: LoadedModel,
    records: Sequence[CounterfactRecord],
    per_record: list[dict[str, Any]],
    memories: Any,
    tokens: int,
    bos: bool | None,
    *,
    memories_per_prompt: Sequence[Any] | None = None,
    before: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Each record's mean n-gram entropy before and after (``fluency_before`` and
    ``fluency_after`` in its entry of ``per_record``, matched by position) over its
    fluency prompts, generated in one batched run; the rows, for the JSON output.
    ``memories_per_prompt``, if given, holds one entry per record (each edit alone);
    ``before``, the unedited continuations of the records' fluency prompts, if already
    made."""
    from meminject.fluency import measure_fluency

    prompts = [(i, p) for i, r in enumerate(records) for p in r.fluency_prompts]
    per_prompt = None
    if memories_per_prompt is not None:
        per_prompt = [memories_per_prompt[i] for i, _ in prompts]
    rows = measure_fluency(
        model, [p for _, p in prompts], None if per_prompt else memories,
        memories_per_prompt=per_prompt, tokens=tokens, prepend_bos=bos, before=before,
    )  # fmt: skip
    for i, entry in enumerate(per_record):
        entry.update(
            mean_entropies([row for (j, _), row in zip(prompts, rows, strict=True) if j == i])
        )
    return [
        {"case_id": records[i].case_id, **asdict(row)}
        for (i, _), row in zip(prompts, rows, strict=True)
    ]


#: One prompt's scores: log p(new), log p(true), the new target all top-1, top token.
PromptScores = tuple[float, float, bool, int]


def add_prompt_shares(
    shares: dict[str, list[float]], kind: str, before: PromptScores, after: PromptScores
) -> None:
    """Append one prompt's hits to its record's lists: efficacy or paraphrase p(new) >
    p(true), the rewrite's teacher-forced accuracy, the neighbourhood score p(true) >
    p(new), and locality (the top token unchanged), before and after the edit."""
    for label, (lp_new, lp_true, acc, _top) in (("before", before), ("after", after)):
        if kind == "neighborhood":
            shares.setdefault(f"neighborhood_score_{label}", []).append(float(lp_true > lp_new))
        else:
            shares.setdefault(f"{kind}_{label}", []).append(float(lp_new > lp_true))
        if kind == "rewrite":
            shares.setdefault(f"rewrite_acc_{label}", []).append(float(acc))
    if kind == "neighborhood":
        shares.setdefault("locality", []).append(float(before[3] == after[3]))


def mean_over_records(per_record: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's mean over the records that have it (records' prompts averaged
    first, as ROME does), and the number of records."""
    names = sorted({k for r in per_record for k in r if k != "case_id"})
    metrics: dict[str, Any] = {}
    for name in names:
        values = [r[name] for r in per_record if name in r]
        metrics[name] = sum(values) / len(values)
    metrics["records"] = len(per_record)
    return metrics
