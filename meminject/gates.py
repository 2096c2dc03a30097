"""The similarity gate of local (gated) memories: ``s = exp(−(x²/b²)^h)``,
``x = 1 − (a·k)/‖k‖²``, for a bank of memories at once.

The ``gated`` strategy applies it and ``learn`` scores candidate boundaries with the
same body, so the boundary chosen is the boundary applied; it lives here, below both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from meminject.extension import InjectionContext


def gate_values(
    flat: Float[Tensor, "batch pos width"],
    keys: Float[Tensor, "memories width"],
    boundary: Float[Tensor, " memories"],
    hardness: Float[Tensor, " memories"],
) -> Float[Tensor, "batch pos memories"]:
    """s = exp(−(x²/b²)^h) with x = 1 − (a·k)/‖k‖², for every memory at once."""
    x = 1.0 - (flat @ keys.T) / (keys * keys).sum(-1)
    return (-(((x * x) / (boundary * boundary)) ** hardness)).exp()


def gate_body(
    keys: Tensor, deltas: Tensor, boundary: Tensor, hardness: Tensor, positions: Any
) -> Any:
    """The hook body of a bank of gated memories; ``learn`` scores boundaries with it too,
    so the boundary chosen is the boundary applied."""

    def body(activation: Tensor, ctx: InjectionContext) -> Tensor:
        index = ctx.index(positions, activation.shape[1], activation.device)
        if index is None:
            return activation
        selected = activation[:, index]
        flat = selected.reshape(*selected.shape[:2], -1).to(keys.dtype)
        gates = gate_values(flat, keys, boundary, hardness)
        update = (gates @ deltas).reshape(selected.shape).to(activation.dtype)
        if isinstance(index, slice) and index == slice(None):
            return activation + update
        out = activation.clone()
        out[:, index] = selected + update
        return out

    return body
