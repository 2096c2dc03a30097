"""The similarity gates of local (gated) memories, for a bank of memories at once.

A gated memory adds ``s·Δ`` where the gate ``s ∈ [0, 1]`` says how much the activation
``a`` resembles the key ``k``. Three gates are registered (:data:`GATES`), each with its
own parameter in the memory file and the hardness ``h``:

* ``projection`` (the blog's, the default): ``x = 1 − (a·k)/‖k‖²``,
  ``s = exp(−(x²/b²)^h)``, parameter ``boundary`` b in (0, 1). It sees only the
  projection of ``a`` on the key, so it is not local: an activation orthogonal to the key
  has x = 1 and opens it to ``exp(−b^(−2h))`` (b below 1 keeps that below e⁻¹).
* ``cosine``: ``c = a·k/(‖a‖‖k‖)``, ``s = ((c − t)/(1 − t))₊^h``, parameter
  ``min_cosine`` t in (0, 1): closed (exactly 0) unless the angle to the key is small.
* ``distance``: ``d = ‖a − k‖/‖k‖``, ``s = (1 − d²/r²)₊^h``, parameter ``radius`` r in
  (0, 1]: closed (exactly 0) outside a ball around the key; any activation orthogonal to
  the key is at d ≥ 1.

The ``gated`` strategy applies them and ``learn`` scores candidate parameters with the
same body, so the value chosen is the value applied; this module lives below both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meminject.schema import GATE_NAMES, GATES, PARAMETER_FIELDS, GateKind, register_gate

__all__ = [
    "GATES",
    "GATE_NAMES",
    "PARAMETER_FIELDS",
    "GateKind",
    "gate_body",
    "gate_kind",
    "gate_values",
    "register_gate",
]

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from meminject.extension import InjectionContext


def gate_kind(name: str) -> GateKind:
    from meminject.errors import BadInputError

    try:
        return GATES[name]
    except KeyError:
        raise BadInputError(f"unknown gate '{name}'; registered: {', '.join(GATE_NAMES)}") from None


def gate_values(
    flat: Float[Tensor, "batch pos width"],
    keys: Float[Tensor, "memories width"],
    boundary: Float[Tensor, " memories"],
    hardness: Float[Tensor, " memories"],
    kinds: Tensor | None = None,
) -> Float[Tensor, "batch pos memories"]:
    """Every memory's gate at every row. ``boundary`` holds each memory's own parameter
    (b, t or r) and ``kinds`` each memory's gate code (None: all ``projection``)."""
    import torch

    dots = flat @ keys.T
    key_sq = (keys * keys).sum(-1)
    x = 1.0 - dots / key_sq
    projection = (-(((x * x) / (boundary * boundary)) ** hardness)).exp()
    if kinds is None or not bool((kinds != 0).any()):
        return projection
    a_sq = (flat * flat).sum(-1, keepdim=True)
    cos = dots / (a_sq.sqrt() * key_sq.sqrt()).clamp_min(torch.finfo(flat.dtype).tiny)
    cosine = ((cos - boundary) / (1.0 - boundary)).clamp(0.0, 1.0) ** hardness
    dist_sq = ((a_sq - 2.0 * dots + key_sq) / key_sq).clamp_min(0.0)
    distance = (1.0 - dist_sq / (boundary * boundary)).clamp(0.0, 1.0) ** hardness
    codes = kinds.to(flat.device)
    out = torch.where(codes == GATES["cosine"].code, cosine, projection)
    return torch.where(codes == GATES["distance"].code, distance, out)


def gate_body(
    keys: Tensor,
    deltas: Tensor,
    boundary: Tensor,
    hardness: Tensor,
    positions: Any,
    kinds: Tensor | None = None,
) -> Any:
    """The hook body of a bank of gated memories; ``learn`` scores boundaries with it too,
    so the boundary chosen is the boundary applied."""

    def body(activation: Tensor, ctx: InjectionContext) -> Tensor:
        index = ctx.index(positions, activation.shape[1], activation.device)
        if index is None:
            return activation
        selected = activation[:, index]
        flat = selected.reshape(*selected.shape[:2], -1).to(keys.dtype)
        gates = gate_values(flat, keys, boundary, hardness, kinds)
        update = (gates @ deltas).reshape(selected.shape).to(activation.dtype)
        if isinstance(index, slice) and index == slice(None):
            return activation + update
        out = activation.clone()
        out[:, index] = selected + update
        return out

    return body
