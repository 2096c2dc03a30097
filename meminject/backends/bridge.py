"""The ``bridge`` backend: TransformerLens's ``TransformerBridge`` runs the forward.

It serves every hook point the bridge has, per-head results included, at the cost of
the bridge's per-component wrappers on every forward. ``resid_mid`` is lowered onto the
attention output (see :func:`meminject.engine.bridge_fwd_hooks`), and the bridge is asked
to compute per-head results only while a body needs them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from meminject.backends import Body, Step

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from meminject.models import LoadedModel


class BridgeBackend:
    name = "bridge"
    features = frozenset({"kv_cache", "padded_batch", "python_hooks"})

    def __init__(self, model: LoadedModel):
        self.model = model

    def unsupported(self, hook_name: str) -> str | None:
        if hook_name.endswith(".hook_resid_mid") and getattr(
            self.model.cfg, "parallel_attn_mlp", False
        ):
            return (
                f"model '{self.model.name}' runs attention and MLP in parallel, so it has "
                "no resid_mid"
            )
        if hook_name not in self.model.bridge.hook_dict:
            return f"model '{self.model.name}' has no hook point '{hook_name}'"
        return None

    @contextmanager
    def hooks(self, bodies: Mapping[str, Body]) -> Iterator[None]:
        from meminject.engine import bridge_fwd_hooks

        bridge = self.model.bridge
        fwd_hooks = bridge_fwd_hooks(
            self.model, [(name, _with_hook_arg(body)) for name, body in bodies.items()]
        )
        needs_result = any(name.endswith(".attn.hook_result") for name in bodies)
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
