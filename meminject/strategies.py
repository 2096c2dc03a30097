"""Built-in injection strategies, registered through the same hook as plugins' strategies.

``add`` is the paper's memory injection: ``a ← a + τ·v`` at a site of layer ℓ and
the chosen positions. Memories that share a hook point are applied by one hook
function, so a set of many memories still costs one Python call per site.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meminject.extension import CompileContext, InjectionContext, SiteHook, Strategy
from meminject.hookspecs import hookimpl
from meminject.schema import SITE_HOOKS, AddMemory

if TYPE_CHECKING:
    from torch import Tensor


class AddStrategy(Strategy):
    """Add τ·v, v from the memory's encoder, to one head's result or a layer-wide site."""

    name = "add"
    memory_model = AddMemory

    def is_noop(self, memory: Any) -> bool:
        return not memory.enabled or memory.tau == 0

    def compile(self, memories: Sequence[Any], ctx: CompileContext) -> list[SiteHook]:
        model = ctx.model
        by_hook: dict[str, list[tuple[int | None, Tensor, Any]]] = defaultdict(list)
        for memory in memories:
            site = memory.resolved_site
            vector = ctx.encode(memory)
            if vector.shape != (model.dims.d_model,):
                raise ctx.error(
                    memory,
                    f"encoder '{memory.encoding}' gave a vector of shape {tuple(vector.shape)}, "
                    f"but site '{site}' needs ({model.dims.d_model},)",
                    "encoding",
                )
            delta = (memory.tau * vector).to(device=model.device, dtype=model.dtype)
            hook_name = SITE_HOOKS[site].format(layer=memory.layer)
            by_hook[hook_name].append((memory.head, delta, memory.positions))
        return [
            SiteHook(name, _adder(items), needs_attn_result=name.endswith("attn.hook_result"))
            for name, items in by_hook.items()
        ]


def _adder(items: list[tuple[int | None, Tensor, Any]]) -> Any:
    def body(activation: Tensor, ctx: InjectionContext) -> Tensor:
        out = None
        seq_len = activation.shape[1]
        for head, delta, positions in items:
            index = ctx.index(positions, seq_len, activation.device)
            if index is None:
                continue
            if out is None:
                out = activation.clone()
            if head is None:
                out[:, index] += delta
            else:
                out[:, index, head] += delta
        return activation if out is None else out

    return body


@hookimpl
def register_strategies(register: Any) -> None:
    register("add", AddStrategy)
