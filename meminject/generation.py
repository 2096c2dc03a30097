"""Generation with memories active, driven by meminject's own decoding loop over a backend.

The loop is ours (not ``transformers``' ``generate``) because hooks must know the
absolute position of every token they see: with a KV cache a step's forward holds one
token, without one it holds the whole sequence. The loop sets each row's
``InjectionContext.offset`` before every forward, which is what makes every positions
mode give the same tokens with the cache on and off.

**Batches.** Prompts are left-padded to a common length, with an attention mask and
position ids that start every row at position 0, so a row computes what it would alone.
Each row may carry its own memory set: at every hook point, the rows that share a set and
a padding run that set's bodies on their own slice of the activation, without the padded
columns and with their own prompt length and offset. A body therefore sees exactly the
tensor it would see if its prompt ran alone (a test checks greedy tokens against solo
runs for every positions mode, cache on and off, mixed sets in one batch).

The loop only talks to :class:`meminject.backends.Backend`: there is no branch per backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from meminject.engine import (
    CompiledHook,
    MemoriesArg,
    as_compiled,
    as_memory_set,
    chain_parts,
    compile_memories,
    group_by_hook,
)
from meminject.errors import BadInputError, MeminjectError, NonFiniteScoresError
from meminject.extension import InjectionContext

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float
    from torch import Tensor

    from meminject.backends import Backend
    from meminject.model_handle import LoadedModel
    from meminject.plugins import Registry

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class TokenProb:
    token: str
    token_id: int
    prob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before temperature,
    filters and penalty), and the ``logprobs`` most likely tokens at that step."""

    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, int, float], ...] = ()  # (token, id, log-probability)


#: Called after each row picks a token: (the prompt's index, the token id). Returning
#: False ends that prompt there (finish reason ``cancelled``); the others go on.
OnToken = Callable[[int, int], "bool | None"]
#: Called once per prompt as soon as its row ends, while the batch's other rows go on:
#: (the prompt's index, its result, or the error that ended that row alone).
OnFinish = Callable[[int, "Generation | MeminjectError"], None]


@dataclass(frozen=True)
class DecodeOptions:
    """How one prompt is decoded; the names and meanings follow ``transformers``.

    ``temperature = 0`` is greedy decoding (``top_k``, ``top_p`` and ``seed`` then do
    nothing). ``top_k = 0`` and ``top_p = 1`` keep every token. ``repetition_penalty``
    divides the positive scores (multiplies the negative ones) of tokens already in the
    prompt or the completion. ``stop``: the completion ends before the first of these
    strings. ``show_top``: how many most likely next tokens after the prompt to report.
    ``logprobs``: report each generated token's log-probability and this many most
    likely alternatives at its step (None: nothing; OpenAI's ``top_logprobs``).
    """

    max_new_tokens: int = 20
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    show_top: int = 0
    logprobs: int | None = None

    def check(self, vocab: int) -> None:
        """Refuse what would otherwise fail deep inside torch."""
        if self.max_new_tokens < 0:
            raise BadInputError("max_new_tokens must be >= 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise BadInputError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise BadInputError(f"seed must be between 0 and 2**64 - 1, not {self.seed}")
        if not 0 <= self.top_k <= vocab:
            raise BadInputError(
                f"top_k must be between 0 and the vocabulary size {vocab}, not {self.top_k}"
            )
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise BadInputError(f"top_p must be in (0, 1], not {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise BadInputError(
                f"repetition_penalty must be a number > 0, not {self.repetition_penalty}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise BadInputError("stop strings must be non-empty strings")
        if not 0 <= self.show_top <= vocab:
            raise BadInputError(
                f"show_top must be between 0 and the vocabulary size {vocab}, not {self.show_top}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= min(vocab, 20):
            raise BadInputError(f"logprobs must be between 0 and 20, not {self.logprobs}")


@dataclass(frozen=True)
class Generation:
    prompt: str
    completion: str
    prompt_tokens: list[int]
    new_tokens: list[int]
    top_next: list[TokenProb] = field(default_factory=list)  # after the prompt, before sampling
    backend: str = "bridge"  # the backend that ran the forward passes
    backend_note: str | None = None  # why backends tried before it were passed over
    #: ``eos``, ``stop`` (a stop string), ``length`` (max_new_tokens), ``context``
    #: (n_ctx) or ``cancelled`` (an ``on_token`` callback ended it).
    finish_reason: str = "length"
    #: One per new token when ``DecodeOptions.logprobs`` is set, else empty.
    token_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.token_logprobs:
            del data["token_logprobs"]
        return data


def top_tokens(model: LoadedModel, logits: torch.Tensor, k: int) -> list[TokenProb]:
    import torch

    if k <= 0:
        return []
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [
        TokenProb(model.token_str(int(i)), int(i), float(v))
        for v, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


def penalised(
    logits: Float[Tensor, " d_vocab"], seen: list[int], penalty: float
) -> Float[Tensor, " d_vocab"]:
    """``transformers``' repetition penalty: the score of every token in ``seen`` is
    divided by ``penalty`` when positive and multiplied by it when negative."""
    import torch

    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    scores = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return out


def sampling_scores(
    logits: Float[Tensor, " d_vocab"], options: DecodeOptions
) -> Float[Tensor, " d_vocab"]:
    """The scores sampling draws from: logits over the temperature, with the tokens that
    top-k and top-p leave out at −inf (``transformers``' warpers, in that order)."""
    import torch

    # Shift by the maximum before dividing: with a tiny temperature the quotient of the
    # raw logits overflows to inf and the softmax to NaN; shifted, the best token is 0
    # and every other one tends to −inf, which is the greedy limit it should be.
    scores = (logits.double() - logits.double().max()) / options.temperature
    if 0 < options.top_k < scores.shape[-1]:
        kth = scores.topk(options.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if options.top_p < 1.0:
        ordered, order = scores.sort(descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
        dropped = before >= options.top_p
        dropped[0] = False
        scores = scores.scatter(0, order[dropped], -math.inf)
    return scores


def pick_token(
    logits: Float[Tensor, " d_vocab"],
    options: DecodeOptions,
    generator: torch.Generator | None,
) -> int:
    """The next token: argmax when greedy, else a draw from :func:`sampling_scores`."""
    import torch

    if options.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(sampling_scores(logits, options), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


#: A prompt: text, or chat messages (``{"role": …, "content": …}``) for the chat template.
Prompt = str | Sequence[Mapping[str, str]]


def prompt_ids(
    model: LoadedModel, prompt: Prompt, chat: bool = False, prepend_bos: bool | None = None
) -> list[int]:
    """The prompt's token ids: BOS as ``prepend_bos`` says (None: as the model is
    loaded), or the tokenizer's chat template with ``chat`` (one user turn and the
    assistant's opening) or when the prompt is a list of messages (the whole
    conversation)."""
    if isinstance(prompt, str):
        _check_utf8(prompt)
        if not chat:
            return model.check_prompt_ids(model.tokenize(prompt, prepend_bos))
        messages: list[Mapping[str, str]] = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        for message in messages:
            _check_utf8(str(message.get("content", "")))
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(
            f"model '{model.name}' has no chat template in its tokenizer; drop --chat"
        )
    out = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=True
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return model.check_prompt_ids([int(t) for t in ids])


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInputError(
            f"the prompt is not valid UTF-8 (byte {exc.object[exc.start]!r} at character "
            f"{exc.start})"
        ) from exc


def decode_options(**options: Any) -> DecodeOptions:
    """:class:`DecodeOptions` from keyword arguments, with an unknown name a
    :class:`BadInputError` that lists the known ones (stop strings may be any sequence)."""
    import dataclasses

    known = [f.name for f in dataclasses.fields(DecodeOptions)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise BadInputError(
            f"unknown decoding option '{unknown[0]}'; choose from {', '.join(known)}"
        )
    if "stop" in options:
        stop = options["stop"]
        options["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return DecodeOptions(**options)


def generate(
    model: LoadedModel,
    prompt: str,
    memories: MemoriesArg | None = None,
    *,
    chat: bool = False,
    use_kv_cache: bool = True,
    registry: Registry | None = None,
    backend: str = "auto",
    prepend_bos: bool | None = None,
    **options: Any,
) -> Generation:
    """Generate a completion of ``prompt``, with ``memories`` injected if given.

    ``options`` are the fields of :class:`DecodeOptions`: ``max_new_tokens`` (20),
    ``temperature`` (0: greedy), ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``,
    ``stop``, ``stop_at_eos`` and ``show_top`` (that many most likely next tokens after
    the prompt, with their probabilities, in the result). ``chat`` wraps the prompt in
    the tokenizer's chat template. ``backend``: ``"auto"`` runs the first registered
    backend that serves every site the memories use (the plain Hugging Face modules
    ``hf``, else ``bridge``); a name insists on it. ``prepend_bos``: None follows
    :class:`~meminject.model_handle.BosRule` (the memories' ``[model] prepend_bos``
    unless the model's BOS was chosen); a value pins it, so a baseline and an injected
    run of one prompt can share their tokens.
    """
    return generate_batch(
        model,
        [prompt],
        memories,
        options=decode_options(**options),
        chat=chat,
        use_kv_cache=use_kv_cache,
        registry=registry,
        backend=backend,
        prepend_bos=prepend_bos,
    )[0]


def generate_batch(
    model: LoadedModel,
    prompts: Sequence[Prompt],
    memories: MemoriesArg | None = None,
    *,
    memories_per_prompt: Sequence[MemoriesArg | None] | None = None,
    options: DecodeOptions | Sequence[DecodeOptions] | None = None,
    batch_size: int = 8,
    chat: bool = False,
    use_kv_cache: bool = True,
    registry: Registry | None = None,
    backend: str = "auto",
    on_token: OnToken | None = None,
    on_finish: OnFinish | None = None,
    prepend_bos: bool | None = None,
) -> list[Generation]:
    """Generate a completion for each prompt, ``batch_size`` prompts per forward.

    ``memories``: one set for every prompt; or ``memories_per_prompt``, one entry (a
    set, paths, compiled hooks, or None) per prompt, where prompts that share an entry
    object share its compiled hooks. ``options``: one :class:`DecodeOptions` for all,
    or one per prompt.
    Results come back in the order of ``prompts``; each equals the prompt run alone
    (greedy tokens exactly; sampled ones too, given the same seed). ``on_token`` sees
    each token as it is picked (streaming) and may end a prompt early (a client gone).
    ``on_finish`` receives each prompt's result as soon as its row ends, so a short
    answer need not wait for the longest row of its batch (a server answers with it);
    with it, a row whose scores turn non-finite ends alone and is reported with its
    :class:`~meminject.errors.NonFiniteScoresError` (its result, finish reason
    ``error``, stays in the list), where without it the error is raised.
    ``prepend_bos``: as :func:`generate`'s, for every prompt.
    """
    from meminject.backends import select_backend

    if batch_size < 1:
        raise BadInputError(f"batch_size must be >= 1, not {batch_size}")
    prompts = list(prompts)
    per_prompt = _per_prompt(memories, memories_per_prompt, len(prompts))
    all_options = _per_prompt_options(options, len(prompts))
    vocab = model.dims.d_vocab
    for opt in all_options:
        opt.check(vocab)
    compiled_by_id: dict[int, list[CompiledHook]] = {}
    bos_by_id: dict[int, bool] = {}
    rows: list[_Row] = []
    for index, (prompt, mems, opt) in enumerate(zip(prompts, per_prompt, all_options, strict=True)):
        key = id(mems)
        if key not in compiled_by_id:
            compiled_by_id[key], bos_by_id[key] = _compiled_and_bos(model, mems, registry)
        bos = bos_by_id[key] if prepend_bos is None else prepend_bos
        ids = prompt_ids(model, prompt, chat, bos)
        text = prompt if isinstance(prompt, str) else model.decode(ids)
        row = _Row(index, text, ids, compiled_by_id[key], key, opt, on_token)
        row.isolate = on_finish is not None
        rows.append(row)
    hook_names = sorted({c.hook.hook_name for hooks in compiled_by_id.values() for c in hooks})
    chosen, note = select_backend(model, hook_names, backend, registry)
    results: list[Generation | None] = [None] * len(rows)

    def ended(row: _Row) -> None:
        results[row.index] = _result(model, row, chosen.name, note)
        if on_finish is not None:
            on_finish(row.index, row.error or results[row.index])  # type: ignore[arg-type]

    for chunk in _chunks(model, rows, batch_size, chosen):
        _run_chunk(model, chosen, chunk, use_kv_cache, ended)
    return [r for r in results if r is not None]


def _compiled_and_bos(
    model: LoadedModel, memories: MemoriesArg | None, registry: Registry | None
) -> tuple[list[CompiledHook], bool]:
    """A set's hooks, and whether its prompts start with BOS: the set's ``[model]
    prepend_bos`` applies unless the caller chose, as on the command line."""
    if memories is None or (
        isinstance(memories, list) and all(isinstance(m, CompiledHook) for m in memories)
    ):
        return as_compiled(model, memories, registry), model.prepend_bos
    memory_set = as_memory_set(memories, registry)  # type: ignore[arg-type]
    bos = model.prepend_bos_for(memory_set.model_info())
    return compile_memories(model, memory_set, registry), bos


@dataclass
class _Row:
    index: int
    prompt: str
    ids: list[int]
    compiled: list[CompiledHook]
    set_key: int
    options: DecodeOptions
    on_token: OnToken | None = None
    new_tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    top: list[TokenProb] = field(default_factory=list)
    finish_reason: str | None = None
    completion: str | None = None  # set when a stop string cut it
    #: End this row alone on non-finite scores (``error``) rather than raise.
    isolate: bool = False
    error: MeminjectError | None = None
    reported: bool = False


def _per_prompt(memories: Any, per_prompt: Sequence[Any] | None, n: int) -> list[Any]:
    if per_prompt is None:
        return [memories] * n
    if memories is not None:
        raise BadInputError("give memories (one set for all) or memories_per_prompt, not both")
    listed = list(per_prompt)
    if len(listed) != n:
        raise BadInputError(f"{len(listed)} memory sets were given for {n} prompts")
    return listed


def _per_prompt_options(options: Any, n: int) -> list[DecodeOptions]:
    if options is None:
        return [DecodeOptions()] * n
    if isinstance(options, DecodeOptions):
        return [options] * n
    listed = list(options)
    if len(listed) != n:
        raise BadInputError(f"{len(listed)} decoding options were given for {n} prompts")
    return listed


def _chunks(
    model: LoadedModel, rows: list[_Row], batch_size: int, backend: Backend
) -> Iterator[list[_Row]]:
    """Batches of similar length (less padding). A row runs alone when the backend cannot
    pad, or when padding would take the batch past the model's context."""
    ordered = sorted(rows, key=lambda r: len(r.ids))
    if "padded_batch" not in backend.features:
        batch: list[_Row] = []
        for row in ordered:  # only rows of one length share a batch
            if batch and (len(batch) == batch_size or len(batch[0].ids) != len(row.ids)):
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch
        return
    n_ctx = model.dims.n_ctx
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        longest = max(len(r.ids) for r in chunk)
        most_new = max(r.options.max_new_tokens for r in chunk)
        if len(chunk) > 1 and longest + most_new > n_ctx:
            yield from ([r] for r in chunk)
        else:
            yield chunk


class _Forward:
    """Where the current forward starts, in padded columns (the rows' hooks read it)."""

    start = 0


def _row_bodies(chunk: list[_Row], pads: list[int], state: _Forward, device: Any) -> dict[str, Any]:
    """One body per hook point that runs each (set, padding) group's chain on its rows,
    on the columns that are real tokens, with the group's own positions context.

    A hook point whose every part is an addition at all positions (``SiteHook.additions``)
    does not depend on positions, so its rows are not split by padding, and a set that
    covers the batch adds to it whole: the padded columns get the addition too, which
    changes nothing, since no real token attends to them."""
    import torch

    sets: dict[int, list[int]] = {}
    for i, row in enumerate(chunk):
        if row.compiled:
            sets.setdefault(row.set_key, []).append(i)
    by_hook: dict[str, list[tuple[list[int], int | None, InjectionContext, Any]]] = {}
    for members in sets.values():
        for name, parts in group_by_hook(chunk[members[0]].compiled).items():
            by_pad: dict[int | None, list[int]] = {}
            for i in members:
                by_pad.setdefault(None if _position_free(parts) else pads[i], []).append(i)
            for pad, rows in by_pad.items():
                ctx = InjectionContext(prompt_len=len(chunk[rows[0]].ids))
                by_hook.setdefault(name, []).append((rows, pad, ctx, chain_parts(name, parts, ctx)))
    n_rows = len(chunk)

    def make(entries: list[tuple[list[int], int | None, InjectionContext, Any]]) -> Any:
        if len(entries) == 1 and not entries[0][1] and len(entries[0][0]) == n_rows:
            _, _, ctx, chain = entries[0]

            def whole(activation: Tensor) -> Tensor:  # one set for all, nothing to slice
                ctx.offset = state.start
                return chain(activation)

            return whole
        indices = {
            id(entry): torch.tensor(entry[0], dtype=torch.long, device=device) for entry in entries
        }

        def body(activation: Tensor) -> Tensor:
            width = activation.shape[1]
            out = activation.clone()
            for entry in entries:
                _, pad, ctx, chain = entry
                lo = 0 if pad is None else max(0, pad - state.start)
                if lo >= width:
                    continue
                ctx.offset = state.start + lo - (pad or 0)
                rows = indices[id(entry)]
                out[rows, lo:] = chain(activation[rows, lo:])
            return out

        return body

    return {name: make(entries) for name, entries in by_hook.items()}


def _position_free(parts: list[CompiledHook]) -> bool:
    return all(
        part.hook.additions and all(a.positions == "all" for a in part.hook.additions)
        for part in parts
    )


def _run_chunk(
    model: LoadedModel,
    backend: Backend,
    chunk: list[_Row],
    use_kv_cache: bool,
    ended: Callable[[_Row], None],
) -> None:
    """Decode one batch; ``ended`` gets each row once, at the step it finishes."""
    import torch

    from meminject.backends import Step

    device = model.device
    longest = max(len(r.ids) for r in chunk)
    pads = [longest - len(r.ids) for r in chunk]
    padded = any(pads)
    pad_id = model.pad_token_id
    sequence = torch.tensor(
        [[pad_id] * pad + row.ids for pad, row in zip(pads, chunk, strict=True)],
        dtype=torch.long,
        device=device,
    )
    mask = (
        torch.tensor(
            [[0] * pad + [1] * len(row.ids) for pad, row in zip(pads, chunk, strict=True)],
            dtype=torch.long,
            device=device,
        )
        if padded
        else None
    )
    generators = [_generator(model, row.options.seed) for row in chunk]
    eos = model.tokenizer.eos_token_id
    n_ctx = model.dims.n_ctx
    state = _Forward()
    steps = max(max(r.options.max_new_tokens, 1 if r.options.show_top else 0) for r in chunk)
    with _scope(backend, _row_bodies(chunk, pads, state, device)), torch.no_grad():
        past = None
        for step in range(steps):
            if all(row.finish_reason is not None for row in chunk):
                break
            start = sequence.shape[1] - 1 if (use_kv_cache and past is not None) else 0
            state.start = start
            positions = None
            if mask is not None:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
            logits, past = backend.forward(
                Step(
                    sequence[:, start:],
                    past=past if use_kv_cache else None,
                    use_cache=use_kv_cache,
                    attention_mask=mask,
                    position_ids=positions,
                )
            )
            if not use_kv_cache:
                past = None
            last = logits[:, -1]
            # One call for the whole batch: every row's finiteness and greedy token.
            finite = torch.isfinite(last).all(-1).tolist()
            greedy = last.argmax(-1).tolist()
            chosen = []
            for i, row in enumerate(chunk):
                chosen.append(
                    _step_row(
                        model, row, last[i], step, generators[i], eos, n_ctx, finite[i], greedy[i]
                    )
                )
            column = torch.tensor(chosen, dtype=torch.long, device=device).unsqueeze(1)
            sequence = torch.cat([sequence, column], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(column)], dim=1)
            _report(chunk, ended)
    for row in chunk:
        if row.finish_reason is None:
            row.finish_reason = "length"
    _report(chunk, ended)


def _report(chunk: list[_Row], ended: Callable[[_Row], None]) -> None:
    for row in chunk:
        if row.finish_reason is not None and not row.reported:
            row.reported = True
            ended(row)


def _step_row(
    model: LoadedModel,
    row: _Row,
    last: Tensor,
    step: int,
    generator: torch.Generator | None,
    eos: int | None,
    n_ctx: int,
    finite: bool,
    argmax: int,
) -> int:
    """Pick row's next token (or a filler, once it is finished) and update its state.
    ``finite`` and ``argmax`` are the row's, computed for the whole batch at once."""
    if row.finish_reason is not None:
        return row.new_tokens[-1] if row.new_tokens else row.ids[-1]
    opt = row.options
    if not finite:
        error = NonFiniteScoresError(
            f"the model's next-token scores became non-finite at step {step + 1}; "
            "a memory's vector is probably too large for the model's dtype"
        )
        if not row.isolate:
            raise error
        row.error, row.finish_reason = error, "error"
        return row.new_tokens[-1] if row.new_tokens else row.ids[-1]
    if step == 0 and opt.show_top:
        row.top = top_tokens(model, last, opt.show_top)
    if step >= opt.max_new_tokens:
        row.finish_reason = "length"
        return row.ids[-1]
    if opt.temperature <= 0 and opt.repetition_penalty == 1.0:
        token = argmax
    else:
        scores = penalised(last, row.ids + row.new_tokens, opt.repetition_penalty)
        token = pick_token(scores, opt, generator)
    row.new_tokens.append(token)
    if opt.logprobs is not None:
        row.logprobs.append(_token_logprob(model, last, token, opt.logprobs))
    if row.on_token is not None and row.on_token(row.index, token) is False:
        row.finish_reason = "cancelled"
    elif opt.stop_at_eos and eos is not None and token == eos:
        row.finish_reason = "eos"
    elif opt.stop and _cut_at_stop(model, row):
        row.finish_reason = "stop"
    elif len(row.new_tokens) >= opt.max_new_tokens:
        row.finish_reason = "length"
    elif len(row.ids) + len(row.new_tokens) > n_ctx:
        row.finish_reason = "context"
    return token


def _token_logprob(model: LoadedModel, last: Tensor, token: int, k: int) -> TokenLogprob:
    import torch

    logprobs = torch.log_softmax(last.float(), dim=-1)
    top: tuple[tuple[str, int, float], ...] = ()
    if k:
        values, ids = torch.topk(logprobs, k)
        top = tuple(
            (model.token_str(i), i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        )
    return TokenLogprob(model.token_str(token), token, float(logprobs[token]), top)


def _cut_at_stop(model: LoadedModel, row: _Row) -> bool:
    text = model.decode(row.new_tokens)
    hits = [text.find(s) for s in row.options.stop if s in text]
    if not hits:
        return False
    row.completion = text[: min(hits)]
    return True


def _result(model: LoadedModel, row: _Row, backend: str, note: str | None) -> Generation:
    eos = model.tokenizer.eos_token_id
    if row.completion is None:
        shown = [t for t in row.new_tokens if not (row.options.stop_at_eos and t == eos)]
        row.completion = model.decode(shown)
    return Generation(
        prompt=row.prompt,
        completion=row.completion,
        prompt_tokens=list(row.ids),
        new_tokens=list(row.new_tokens),
        top_next=list(row.top),
        backend=backend,
        backend_note=note,
        finish_reason=row.finish_reason or "length",
        token_logprobs=list(row.logprobs),
    )


def _generator(model: LoadedModel, seed: int | None) -> torch.Generator | None:
    import torch

    if seed is None:
        return None
    return torch.Generator(device=model.device).manual_seed(seed)


@contextmanager
def _scope(backend: Backend, bodies: dict[str, Any]) -> Iterator[None]:
    if not bodies:
        yield
        return
    with backend.hooks(bodies):
        yield
