"""Generation with a memory set active, driven by meminject's own decoding loop.

The loop is ours (not ``TransformerBridge.generate``) because hooks must know
the absolute position of every token they see: with a KV cache a step's forward
holds one token, without one it holds the whole sequence. The loop sets
``InjectionContext.offset`` before each forward, which is what makes every
positions mode give the same tokens with the cache on and off.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from meminject.engine import MemoriesArg, as_compiled, group_by_hook, inject
from meminject.errors import BadInputError, InjectionError
from meminject.extension import InjectionContext

if TYPE_CHECKING:
    import torch

    from meminject.models import LoadedModel
    from meminject.plugins import Registry


@dataclass(frozen=True)
class TokenProb:
    token: str
    token_id: int
    prob: float


@dataclass(frozen=True)
class Generation:
    prompt: str
    completion: str
    prompt_tokens: list[int]
    new_tokens: list[int]
    top_next: list[TokenProb] = field(default_factory=list)  # after the prompt, before sampling
    backend: str = "bridge"  # what ran the forward passes: "hf" (plain model) or "bridge"
    backend_note: str | None = None  # why the bridge ran when the fast path was not used

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    import torch

    if temperature <= 0:
        return int(logits.argmax())
    # Shift by the maximum before dividing: with a tiny temperature the quotient of the
    # raw logits overflows to inf and the softmax to NaN; shifted, the best token is 0
    # and every other one tends to −inf, which is the greedy limit it should be.
    shifted = logits.double() - logits.double().max()
    probs = torch.softmax(shifted / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


MAX_SEED = 2**64 - 1


def check_options(
    model: LoadedModel,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    seed: int | None,
    top_k: int,
) -> None:
    """Refuse what would otherwise fail deep inside torch or the tokenizer."""
    import math

    if max_new_tokens < 0:
        raise BadInputError("max_new_tokens must be >= 0")
    if not math.isfinite(temperature) or temperature < 0:
        raise BadInputError(f"temperature must be a finite number >= 0, not {temperature}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise BadInputError(f"seed must be between 0 and 2**64 - 1, not {seed}")
    vocab = model.dims.d_vocab
    if not 0 <= top_k <= vocab:
        raise BadInputError(f"top_k must be between 0 and the vocabulary size {vocab}, not {top_k}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInputError(
            f"the prompt is not valid UTF-8 (byte {exc.object[exc.start]!r} at character "
            f"{exc.start})"
        ) from exc


def generate(
    model: LoadedModel,
    prompt: str,
    memories: MemoriesArg | None = None,
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int | None = None,
    use_kv_cache: bool = True,
    stop_at_eos: bool = True,
    top_k: int = 0,
    registry: Registry | None = None,
    backend: str = "auto",
) -> Generation:
    """Generate a completion of ``prompt``, with ``memories`` injected if given.

    ``temperature=0`` is greedy decoding. ``top_k`` asks for that many most likely
    next tokens after the prompt (with their probabilities) in the result.
    ``backend``: ``"auto"`` runs the plain Hugging Face model with hooks only at the
    memories' sites when every site verifies against the bridge (see
    :mod:`meminject.fastpath`), else the bridge; ``"hf"`` insists on the plain model;
    ``"bridge"`` always uses the bridge.
    """
    import torch

    from meminject import fastpath

    fastpath.check_backend(backend)
    check_options(model, prompt, max_new_tokens, temperature, seed, top_k)
    tokens = model.to_tokens(prompt)
    prompt_len = tokens.shape[1]
    ctx = InjectionContext(prompt_len=prompt_len)
    compiled = as_compiled(model, memories, registry)
    grouped = group_by_hook(compiled)
    plain, note = fastpath.select(model, list(grouped), backend)
    if plain is not None:
        scope: Any = plain.hooks(fastpath.plain_bodies(grouped, ctx))
    else:
        scope = inject(model, compiled, context=ctx) if compiled else nullcontext()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    eos = model.tokenizer.eos_token_id
    n_ctx = model.dims.n_ctx
    bridge = model.bridge
    new_tokens: list[int] = []
    top: list[TokenProb] = []
    with scope, torch.no_grad():
        past = None
        sequence = tokens
        for step in range(max(max_new_tokens, 1) if top_k else max_new_tokens):
            fresh = sequence
            if use_kv_cache and past is not None:
                fresh = sequence[:, -1:]
            ctx.offset = sequence.shape[1] - fresh.shape[1]
            if plain is not None:
                logits, past = plain.forward(fresh, past, use_cache=use_kv_cache)
            elif use_kv_cache:
                logits, past = bridge(
                    fresh, return_type="logits_and_cache", past_key_values=past, use_cache=True
                )
            else:
                logits = bridge(sequence, return_type="logits")
            last = logits[0, -1]
            if not bool(torch.isfinite(last).all()):
                raise InjectionError(
                    f"the model's next-token scores became non-finite at step {step + 1}; "
                    "a memory's vector is probably too large for the model's dtype"
                )
            if step == 0 and top_k:
                top = top_tokens(model, last, top_k)
            if step >= max_new_tokens:
                break
            token = _pick(last, temperature, generator)
            new_tokens.append(token)
            if (stop_at_eos and eos is not None and token == eos) or (
                sequence.shape[1] + 1 > n_ctx
            ):
                break
            sequence = torch.cat(
                [sequence, torch.tensor([[token]], dtype=sequence.dtype, device=sequence.device)],
                dim=1,
            )
    shown = [t for t in new_tokens if not (stop_at_eos and t == eos)]
    return Generation(
        prompt=prompt,
        completion=model.decode(shown),
        prompt_tokens=tokens[0].tolist(),
        new_tokens=new_tokens,
        top_next=top,
        backend="hf" if plain is not None else "bridge",
        backend_note=note,
    )
