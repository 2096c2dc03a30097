"""The ``relative`` strategy: add a memory in proportion to the activation it joins.

The paper's ``add`` strategy adds ``τ·v``, a fixed vector. How large that is compared
with the activation depends on the layer (residual-stream norms grow with depth, often
by an order of magnitude), on the model, and on the encoder (``unembed`` of a
three-token text is about three times longer than of one token). So the τ that helps at
layer 2 swamps or vanishes at layer 9, and a τ grid tuned on one model means little
on the next.

``relative`` adds, at every selected position,

    a ← a + τ · ‖a‖ · v / ‖v‖

so τ is the size of the memory *as a fraction of the activation at that position*:
τ = 0.5 adds a vector half as long as what is there, at any layer, in any model, with
any encoder. The norm is taken of the activation as it arrives at the hook, before any
memory at that hook is added, so several relative memories at one site do not depend
on their order.

Memories have the fields of ``add`` memories (``text``, ``encoding``, ``params``,
``layer``, ``head``, ``site``, ``positions``, ``enabled``) plus ``strategy =
"relative"``; only τ's meaning changes. The module imports no torch at import time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasChoices, Field

from meminject import hookimpl
from meminject.extension import CompileContext, InjectionContext, SiteHook, Strategy, site_hook
from meminject.schema import AddMemory

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["RelativeMemory", "RelativeStrategy", "register_strategies"]

__version__ = "0.1.0"


class RelativeMemory(AddMemory):
    """A text memory whose size is a fraction τ of the activation's norm."""

    # Required (no default): a memory without ``strategy`` is an ``add`` memory.
    strategy: Literal["relative"]
    tau: float = Field(
        ...,
        validation_alias=AliasChoices("tau", "τ"),
        serialization_alias="tau",
        description="Length of the added vector as a fraction of the activation's norm at "
        "each position: a ← a + τ·‖a‖·v/‖v‖ ('τ' is accepted too).",
    )


Item = tuple["int | None", "Tensor", Any]  # head, τ·v/‖v‖ (float32), positions


class RelativeStrategy(Strategy):
    """Add τ·‖a‖·v/‖v‖: the memory's length is a fraction τ of the activation's."""

    memory_model = RelativeMemory  # its ``strategy`` Literal is the strategy's name

    def is_noop(self, memory: Any) -> bool:
        return not memory.enabled or memory.tau == 0

    def compile(self, memories: Sequence[Any], ctx: CompileContext) -> list[SiteHook]:
        import torch

        by_site: dict[tuple[str, int], list[Item]] = defaultdict(list)
        for memory in memories:
            # [d_model], computed once per (memory, model); meminject has already checked
            # the encoder's shape and values, and names the encoder's plugin if they are off.
            if memory.tau_units != "absolute":
                raise ctx.error(
                    memory, "a relative memory's τ is already relative; drop tau_units", "tau_units"
                )
            vector = ctx.encode(memory)
            direction = vector.to(device=ctx.model.device, dtype=torch.float32)
            norm = float(direction.norm())
            if not math.isfinite(norm) or norm == 0.0:
                raise ctx.error(
                    memory,
                    f"encoder '{memory.encoding}' gave a vector of norm {norm}; a relative "
                    "memory needs a direction",
                    "text",
                )
            by_site[(memory.resolved_site, memory.layer)].append(
                (memory.head, memory.tau * direction / norm, memory.positions)
            )
        # site_hook names the hook point and asks for per-head results when the site has
        # a head axis (attn_result), so neither is written by hand.
        return [
            site_hook(site, layer, relative_body(items)) for (site, layer), items in by_site.items()
        ]


def relative_body(items: list[Item]) -> Any:
    """The hook body for all relative memories at one hook point."""

    def body(activation: Tensor, ctx: InjectionContext) -> Tensor:
        out = None
        for head, scaled, positions in items:
            index = ctx.index(positions, activation.shape[1], activation.device)
            if index is None:
                continue
            if out is None:
                out = activation.clone()
            # Norms come from the incoming activation, never from ``out``: memories at one
            # hook point then do not see each other, and their order does not matter.
            if head is None:
                norms = activation[:, index].float().norm(dim=-1, keepdim=True)
                out[:, index] += (norms * scaled).to(activation.dtype)
            else:
                norms = activation[:, index, head].float().norm(dim=-1, keepdim=True)
                out[:, index, head] += (norms * scaled).to(activation.dtype)
        return activation if out is None else out

    return body


@hookimpl
def register_strategies(register: Any) -> None:
    register(RelativeStrategy)
