"""The ``bridge`` backend: TransformerLens's ``TransformerBridge`` runs the forward.

It serves every hook point the bridge has, per-head results included, at the cost of
the bridge's per-component wrappers on every forward. ``resid_mid`` is lowered onto the
attention output (see :func:`bridge_fwd_hooks`), and the bridge is asked
to compute per-head results only while a body needs them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from meminject.backends import Body, Step
from meminject.errors import BadInputError
from meminject.sites import hook_name, parse_hook_name

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float
    from torch import Tensor

    from meminject.model_handle import LoadedModel


class BridgeBackend:
    name = "bridge"
    features = frozenset({"kv_cache", "padded_batch", "python_hooks"})

    def __init__(self, model: LoadedModel):
        self.model = model

    def unsupported(self, hook_name: str) -> str | None:
        parsed = parse_hook_name(hook_name)
        site = parsed[0] if parsed is not None else None
        if site is not None and site.name == "resid_mid" and self.model.facts.parallel_attn_mlp:
            return (
                f"model '{self.model.name}' runs attention and MLP in parallel, so it has "
                "no resid_mid"
            )
        if hook_name not in self.model.bridge.hook_dict:
            return f"model '{self.model.name}' has no hook point '{hook_name}'"
        return None

    @contextmanager
    def hooks(self, bodies: Mapping[str, Body]) -> Iterator[None]:
        bridge = self.model.bridge
        fwd_hooks = bridge_fwd_hooks(
            self.model, [(name, _with_hook_arg(body)) for name, body in bodies.items()]
        )
        needs_result = any(_per_head(name) for name in bodies)
        had_result = bool(getattr(bridge.cfg, "use_attn_result", False))
        if needs_result and not had_result:
            bridge.set_use_attn_result(True)
        try:
            with bridge.hooks(fwd_hooks=fwd_hooks):
                yield
        finally:
            if needs_result and not had_result:
                bridge.set_use_attn_result(False)

    def forward(self, step: Step) -> tuple[Float[Tensor, "batch pos d_vocab"], Any]:
        extra: dict[str, Any] = {}
        if step.attention_mask is not None:
            extra["attention_mask"] = step.attention_mask
        if step.position_ids is not None:
            extra["position_ids"] = step.position_ids
        bridge = self.model.bridge
        if step.use_cache:
            logits, past = bridge(
                step.tokens,
                return_type="logits_and_cache",
                past_key_values=step.past,
                use_cache=True,
                **extra,
            )
            return logits, past
        return bridge(step.tokens, return_type="logits", **extra), None


def _with_hook_arg(body: Body) -> Any:
    """TransformerLens calls hooks with ``(activation, hook)``; bodies take one argument."""

    def run(activation: Tensor, hook: Any = None) -> Tensor:
        return body(activation)

    return run


def bridge_fwd_hooks(
    model: LoadedModel, fwd_hooks: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    """The hooks to give the bridge for ``fwd_hooks``, with ``resid_mid`` lowered.

    TransformerBridge's ``hook_resid_mid`` is the input of the second LayerNorm: a
    change made there reaches the MLP but never the residual stream, whereas a memory's
    ``a ← a + τ·v`` at resid_mid (HookedTransformer's meaning; docs/architecture.md,
    "resid_mid means the residual stream") changes the stream itself. In a sequential
    block resid_mid = resid_pre + attn_out, so the change is made to the attention
    output instead: the block input is kept (after any resid_pre hooks), and after any
    attn_out hooks the resid_mid hooks see ``resid_pre + attn_out`` and their difference
    is added to the attention output.
    """
    lowered: list[tuple[str, Any]] = []
    mids: dict[int, list[Any]] = defaultdict(list)
    for name, fn in fwd_hooks:
        parsed = parse_hook_name(name)
        if parsed is None or parsed[0].name != "resid_mid":
            lowered.append((name, fn))
        else:
            mids[parsed[1]].append(fn)
    if mids and model.facts.parallel_attn_mlp:
        raise BadInputError(
            f"model '{model.name}' runs attention and MLP in parallel, so it has no resid_mid"
        )
    for layer, fns in mids.items():
        lowered.extend(_resid_mid_pair(layer, fns))
    return lowered


def _resid_mid_pair(layer: int, fns: list[Any]) -> list[tuple[str, Any]]:
    kept: list[torch.Tensor] = []

    def keep(resid_pre: torch.Tensor, hook: Any) -> torch.Tensor:
        kept[:] = [resid_pre]
        return resid_pre

    def apply(attn_out: torch.Tensor, hook: Any) -> torch.Tensor:
        mid = kept[0] + attn_out
        new = mid
        for fn in fns:
            new = fn(new, hook)
        return attn_out + (new - mid)

    return [(hook_name("resid_pre", layer), keep), (hook_name("attn_out", layer), apply)]


def _per_head(name: str) -> bool:
    parsed = parse_hook_name(name)
    return parsed is not None and parsed[0].per_head
