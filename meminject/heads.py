"""Routing a model-width memory through one attention head.

The paper injects memories into single heads. Read literally (add ``v`` to head h's
result, ``attn.hook_result``), that is not a per-head operation at all: a head's result
reaches the residual stream only through the sum over heads, so every head gives the
same model, the one that adds ``v`` to the attention output (docs/architecture.md#strategies).
A head sweep on that site is a table of identical rows.

What does differ between heads is *what they can write*. Head h writes
``z_h · W_O[h]``, so its contributions lie in the row space of ``W_O[h]``, a subspace of
``d_head`` dimensions out of ``d_model``. Injecting a memory *through* head h therefore
means changing the head's value mix ``z_h`` (site ``attn_z``) by the least-squares
solution ``δz = τ·v·pinv(W_O[h])``. The head then writes ``τ·v·P_h``, where ``P_h`` is
the orthogonal projection onto that row space: the part of the memory head h can
express, and nothing else. Heads differ in which part that is, and the sweep's per-head
cells measure it.

Because ``attn_out`` (before any post-attention norm) is linear in ``z``, the change is
applied as the added vector ``τ·v·P_h`` on the attention output, or on the attention's own
output ``attn.hook_out`` in blocks that normalise it (Gemma 2/3): exactly the same numbers
as editing ``hook_z``, without asking the bridge for per-head tensors. The tests compare
the two.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from meminject.model_handle import LoadedModel

#: Relative singular-value threshold below which a direction of ``W_O[h]`` counts as
#: unwritable (the head's output projection is rank-deficient there).
RANK_TOLERANCE = 1e-6

# Per bridge: (layer, head) → orthonormal basis of the row space of W_O[layer, head].
_BASES: weakref.WeakKeyDictionary[Any, dict[tuple[int, int], Tensor]] = weakref.WeakKeyDictionary()


def output_weight(model: LoadedModel, layer: int, head: int) -> Float[Tensor, "d_head d_model"]:
    """``W_O[layer, head]`` in the coordinates the model runs in."""
    return model.bridge.W_O[layer, head].detach()


def head_basis(model: LoadedModel, layer: int, head: int) -> Float[Tensor, "d_model rank"]:
    """An orthonormal basis (float32) of the directions head ``head`` of ``layer`` can write."""
    import torch

    cache = _BASES.setdefault(model.bridge, {})
    key = (int(layer), int(head))
    if key not in cache:
        weight = output_weight(model, layer, head).to(torch.float32)
        _, singular, vh = torch.linalg.svd(weight, full_matrices=False)
        keep = singular > RANK_TOLERANCE * float(singular.max().clamp_min(1e-30))
        cache[key] = vh[keep].T.contiguous()
    return cache[key]


def through_head(
    model: LoadedModel, layer: int, head: int, vectors: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_model"]:
    """``v·P_h``: what head ``head`` writes when its value mix moves by ``v·pinv(W_O[h])``."""
    basis = head_basis(model, layer, head).to(vectors.device)
    flat = vectors.to(basis.dtype)
    return ((flat @ basis) @ basis.T).to(vectors.dtype)


def z_delta(
    model: LoadedModel, layer: int, head: int, vector: Float[Tensor, " d_model"]
) -> Float[Tensor, " d_head"]:
    """``v·pinv(W_O[h])``: the change of head ``head``'s value mix that writes ``v·P_h``
    (for checks and for users who want the ``attn_z`` edit itself)."""
    import torch

    weight = output_weight(model, layer, head).to(torch.float32)
    return (vector.to(torch.float32) @ torch.linalg.pinv(weight)).to(vector.dtype)


def written_share(model: LoadedModel, layer: int, head: int, vector: Tensor) -> float:
    """‖v·P_h‖ / ‖v‖: how much of the memory head ``head`` can express (0…1)."""
    norm = float(vector.float().norm())
    if norm == 0.0:
        return 0.0
    return float(through_head(model, layer, head, vector.float()).norm()) / norm
