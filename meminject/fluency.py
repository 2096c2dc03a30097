"""Fluency of an edited model's generations: ROME's n-gram entropy.

An edit can hold its target and still wreck the text around it: a memory added at every
position, or a gate that opens on generated tokens, tends to make the model repeat
itself. ROME (Meng et al. 2022) measures this as the entropy of the n-gram distribution
of a generation — a weighted average of the bigram and trigram entropies, weights 2/3 and
4/3 — so a looping text scores low and varied text high. meminject reports it beside
efficacy and locality for the same prompts before and after the edit, because the
entropy of a greedy continuation depends on the prompt and the model as much as on the
edit: only the change is the edit's.

Generations are greedy and run their full length (no stop at end-of-sequence), so every
prompt contributes the same number of tokens before and after; the entropy is taken over
the continuation's words (runs of word characters, and each other non-space character
alone), without the prompt, in bits.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meminject.engine import MemoriesArg
    from meminject.model_handle import LoadedModel

#: What counts as a word: a run of word characters, or any other non-space character.
_WORD = re.compile(r"\w+|[^\w\s]")
#: ROME's weights of the bigram and trigram entropies.
NGRAM_WEIGHTS = ((2, 2 / 3), (3, 4 / 3))


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(text: str) -> float:
    """ROME's generation entropy of ``text`` in bits: the mean of (2/3)·H₂ and (4/3)·H₃,
    Hₙ the entropy of the text's n-gram frequencies (0 for a text with no n-gram)."""
    tokens = words(text)
    weighted = []
    for n, weight in NGRAM_WEIGHTS:
        counts = Counter(zip(*(tokens[i:] for i in range(n)), strict=False))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


@dataclass(frozen=True)
class FluencyRow:
    """One prompt's greedy continuation before and after the edit, and their entropies."""

    prompt: str
    before: str
    after: str
    entropy_before: float
    entropy_after: float


def continuations(
    model: LoadedModel,
    prompts: Sequence[str],
    memories: MemoriesArg | None = None,
    *,
    memories_per_prompt: Sequence[Any] | None = None,
    tokens: int = 40,
    prepend_bos: bool | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Each prompt's greedy continuation of exactly ``tokens`` tokens, with ``memories``
    (one set for all), ``memories_per_prompt`` (one entry per prompt) or none, through
    generation's own batched path."""
    from meminject.errors import BadInputError
    from meminject.generation import decode_options, generate_batch

    if tokens < 1:
        raise BadInputError(f"fluency needs at least one generated token, not {tokens}")
    options = decode_options(max_new_tokens=tokens, stop_at_eos=False)
    done = generate_batch(
        model,
        prompts,
        memories,
        memories_per_prompt=memories_per_prompt,
        options=options,
        batch_size=batch_size,
        prepend_bos=prepend_bos,
    )
    return [g.completion for g in done]


def measure_fluency(
    model: LoadedModel,
    prompts: Sequence[str],
    memories: MemoriesArg | None = None,
    *,
    memories_per_prompt: Sequence[Any] | None = None,
    tokens: int = 40,
    prepend_bos: bool | None = None,
    before: Sequence[str] | None = None,
) -> list[FluencyRow]:
    """Continue each prompt greedily for ``tokens`` tokens without memories and with
    ``memories`` or ``memories_per_prompt`` (each edit with its own memory), and score
    both. ``prepend_bos`` pins BOS for both runs (None: generation's rule for the
    memories), so the two continuations start from the same tokens. ``before``: the
    unedited continuations already made (several edits scored on one set of prompts
    share them)."""
    if before is None:
        before = continuations(model, prompts, tokens=tokens, prepend_bos=prepend_bos)
    after = continuations(
        model, prompts, memories, memories_per_prompt=memories_per_prompt, tokens=tokens,
        prepend_bos=prepend_bos,
    )  # fmt: skip
    return [
        FluencyRow(p, b, a, ngram_entropy(b), ngram_entropy(a))
        for p, b, a in zip(prompts, before, after, strict=True)
    ]


def mean_entropies(rows: Sequence[FluencyRow]) -> dict[str, float]:
    """The mean entropy before and after over ``rows`` (NaN-free: empty rows give 0)."""
    n = max(len(rows), 1)
    return {
        "fluency_before": sum(r.entropy_before for r in rows) / n,
        "fluency_after": sum(r.entropy_after for r in rows) / n,
    }
