"""Dataset rows as the sweep feeds them to the model: a row's input ids, read positions
and answer tokens, its random-token controls, and a shard's share of the rows."""

from __future__ import annotations

import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError, RowError, RowTooLongError
from meminject.sweep.config import METRICS

if TYPE_CHECKING:
    from meminject.datasets import PromptRow
    from meminject.model_handle import LoadedModel


@dataclass(frozen=True)
class TokenizedRow:
    """A row as the model sees it: the input ids, and which logits score which targets."""

    row: PromptRow
    input_ids: list[int]
    read_positions: list[int]  # logits at these positions …
    targets: list[int]  # … score these tokens


def answer_tokens(model: LoadedModel, prompt: str, answer: str) -> list[int]:
    """The answer's tokens as a continuation of the prompt (see :mod:`meminject.sweep`)."""
    sep = "" if prompt[-1:].isspace() or answer[:1].isspace() else " "
    head = model.tokenize(prompt, prepend_bos=False)
    full = model.tokenize(prompt + sep + answer, prepend_bos=False)
    if len(full) > len(head) and full[: len(head)] == head:
        return full[len(head) :]
    return model.tokenize(sep + answer, prepend_bos=False)


def tokenize_row(model: LoadedModel, row: PromptRow, metric: str = "first-token") -> TokenizedRow:
    """Input ids (BOS as the model prepends it), read positions and targets of a row."""
    prompt_ids = model.tokenize(row.prompt)
    answer = answer_tokens(model, row.prompt, row.answer)
    if not prompt_ids:
        raise RowError(f"row {row.row_id}: the prompt encodes to no tokens", row.row_id)
    if not answer:
        raise RowError(
            f"row {row.row_id}: the answer {row.answer!r} encodes to no tokens", row.row_id
        )
    if metric == "first-token":
        ids, targets = prompt_ids, answer[:1]
    elif metric == "full":
        ids, targets = prompt_ids + answer[:-1], answer
    else:
        raise BadInputError(f"unknown answer metric '{metric}'; choose {METRICS}")
    if len(ids) > model.dims.n_ctx:
        raise RowTooLongError(
            f"row {row.row_id}: {len(ids)} tokens, longer than the model's context of "
            f"{model.dims.n_ctx}",
            row.row_id,
        )
    first = len(prompt_ids) - 1
    return TokenizedRow(row, ids, list(range(first, first + len(targets))), targets)


# --------------------------------------------------------------------------- controls

#: Per model: token id → "word" (decodes to " letters" and re-tokenizes to itself),
#: "other" (re-tokenizes to itself) or None (unusable). Filled lazily as tokens are drawn.
_TOKEN_KINDS: weakref.WeakKeyDictionary[Any, dict[int, str | None]] = weakref.WeakKeyDictionary()


def _token_kind(model: LoadedModel, token: int) -> str | None:
    kinds = _TOKEN_KINDS.setdefault(model, {})
    if token not in kinds:
        text = model.token_str(token)
        kind: str | None = None
        usable = bool(text) and "\ufffd" not in text and text.isprintable()
        if usable and model.tokenize(text, prepend_bos=False) == [token]:
            word = text[1:]
            is_word = text[0] == " " and len(word) >= 2 and word.isascii() and word.isalpha()
            kind = "word" if is_word else "other"
        kinds[token] = kind
    return kinds[token]


def _draw_tokens(
    model: LoadedModel, rng: random.Random, length: int, banned: set[int]
) -> list[int]:
    """``length`` distinct tokens drawn uniformly from the vocabulary's words (tokens that
    decode to a space and letters, so their concatenation re-tokenizes to them); from any
    self-contained token when a tokenizer has too few such words."""
    tokenizer = model.tokenizer
    vocab = min(model.dims.d_vocab, len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for accepted in (("word",), ("word", "other")):
        chosen: list[int] = []
        for _ in range(200 * length + 1000):
            token = rng.randrange(vocab)
            if token in banned or token in special or token in chosen:
                continue
            if _token_kind(model, token) in accepted:
                chosen.append(token)
                if len(chosen) == length:
                    return chosen
    raise BadInputError(f"model '{model.name}': too few usable tokens to draw controls from")


def control_texts(model: LoadedModel, row: PromptRow, n: int, seed: int) -> list[str]:
    """``n`` random-token memories for ``row``, each with as many tokens as its memory.

    Seeded by ``(seed, row_id, index)`` only, so sharding and batching never change
    them. The memory's and the answer's own tokens are excluded, so a control cannot
    contain the answer by chance; a draw whose text does not re-tokenize to the drawn
    tokens is redrawn, so the control really has that many tokens.
    """
    if n <= 0:
        return []
    memory_ids = model.tokenize(row.memory, prepend_bos=False)
    if not memory_ids:
        raise RowError(
            f"row {row.row_id}: the memory {row.memory!r} encodes to no tokens", row.row_id
        )
    banned = set(memory_ids) | set(answer_tokens(model, row.prompt, row.answer))
    texts = []
    for index in range(n):
        rng = random.Random(f"meminject-control:{seed}:{row.row_id}:{index}")
        for _ in range(100):
            ids = _draw_tokens(model, rng, len(memory_ids), banned)
            text = model.decode(ids)
            if model.tokenize(text, prepend_bos=False) == ids:
                texts.append(text)
                break
        else:
            raise RowError(
                f"row {row.row_id}: could not draw a {len(memory_ids)}-token control that "
                "survives decoding and re-tokenizing with this tokenizer",
                row.row_id,
            )
    return texts


# --------------------------------------------------------------------------- baselines


def in_context_prompt(row: PromptRow) -> str:
    """The in-context baseline's prompt: the memory's text, then the prompt, as one would
    write it into a prompt by hand (a full stop between them unless the memory ends a
    sentence already)."""
    memory = row.memory.strip()
    sep = " " if memory[-1:] in ".!?" else ". "
    return f"{memory}{sep}{row.prompt}"


def with_shuffled(rows: Sequence[PromptRow], seed: int) -> dict[int, str] | None:
    """Each row's shuffled memory: one of the dataset's other memory texts, drawn from the
    seed and the row's id only (so shards and Ray tasks draw alike, given every row).
    None when the dataset has fewer than two different memories."""
    texts = list(dict.fromkeys(row.memory for row in rows))
    if len(texts) < 2:
        return None
    chosen = {}
    for row in rows:
        others = [text for text in texts if text != row.memory]
        chosen[row.row_id] = random.Random(f"meminject-shuffled:{seed}:{row.row_id}").choice(others)
    return chosen


# --------------------------------------------------------------------------- batches, shards


def batch_indices(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The sweep's batches as positions in ``lengths`` (the rows' token counts): similar
    lengths together (less padding), ties in row order, ``batch_size`` per batch and the
    last one what is left. Every executor batches with this rule, so a row meets the
    same batch mates, and gets the same numbers, wherever it runs."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shard_rows(rows: Sequence[PromptRow], shard: tuple[int, int]) -> list[PromptRow]:
    """Rows ``i, i+n, i+2n, …`` of the dataset for shard ``(i, n)``: shards are disjoint
    and their union is the dataset, and each gets a mix of the file's rows."""
    index, count = shard
    return list(rows[index::count])
