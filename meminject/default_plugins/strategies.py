"""Built-in injection strategies, registered through the same hook as plugins' strategies.

``add`` is the paper's memory injection: ``a ← a + τ·v`` at a site of layer ℓ and
the chosen positions (with ``tau_units = "resid_norm"``, ``a ← a + τ·N·v/‖v‖`` for the
memory's reference norm N). ``gated`` is the gradient-derived local memory: ``a ← a + s·Δ``
where the gate ``s = exp(−(x²/b²)^h)``, ``x = 1 − (a·k)/‖k‖²``, fires only on
activations resembling the key. Memories that share a hook point are applied by
one hook function; gated memories that share a hook point and positions are one
batched computation (a keys matrix), so a bank of thousands stays cheap. All gates
of a bank read the activation as it arrives, before any of the bank's deltas.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meminject.dtypes import dtype_name
from meminject.extension import (
    Addition,
    CompileContext,
    Gate,
    InjectionContext,
    SiteHook,
    Strategy,
)
from meminject.gates import GATES, gate_body
from meminject.heads import through_head
from meminject.hookspecs import hookimpl
from meminject.schema import AddMemory, GatedMemory
from meminject.sites import heads_sum_site, hook_name, site_info

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
        by_hook: dict[str, dict[str, tuple[Any, Tensor]]] = defaultdict(dict)
        compiled_site: dict[str, tuple[str, int]] = {}
        for memory in memories:
            site = memory.resolved_site
            vector = ctx.encode(memory)  # [d_model], checked against the encoder contract
            if memory.tau_units == "resid_norm":
                norm = float(vector.float().norm())
                if norm == 0.0:
                    raise ctx.error(
                        memory, "the encoded vector is zero, so it has no direction", "text"
                    )
                vector = vector * (memory.resid_norm / norm)
            delta = (memory.tau * vector).to(device=model.device, dtype=model.dtype)
            if not bool(delta.isfinite().all()):
                raise ctx.error(
                    memory,
                    f"τ·v is not finite in {dtype_name(model.dtype)} "
                    f"(τ = {memory.tau:g}, largest |v| = {float(vector.abs().max()):g}); "
                    "use a smaller tau",
                    "tau",
                )
            # One head's result enters the residual stream only through the sum over
            # heads, so adding v to head h's result is exactly adding v to the layer's
            # attention output. Lowering it there spares the per-head result tensor
            # (batch × pos × heads × d_model) that hook_result would make the model build.
            # Routed through a head (attn_z), the head's value mix moves by
            # τ·v·pinv(W_O[h]) and the attention output by τ·v·P_h (meminject.heads): the
            # same lowering applies to that vector. In a block that normalises the
            # attention output before the residual add (Gemma 2/3), the heads are summed
            # *before* that norm, so the addition goes to the attention's own output
            # (attn.hook_out), which is still exactly the sum.
            if site == "attn_z":
                delta = through_head(model, memory.layer, memory.head, delta)
            if site_info(site).through_heads:
                site = heads_sum_site(model.post_sublayer_norms).name
            point = hook_name(site, memory.layer)
            compiled_site[point] = (site, memory.layer)
            by_hook[point][_positions_key(memory.positions)] = (
                memory.positions,
                by_hook[point].get(_positions_key(memory.positions), (None, 0))[1] + delta,
            )
        return [
            SiteHook(
                name,
                _adder(list(groups.values())),
                additions=tuple(
                    Addition(*compiled_site[name], name, positions, delta)
                    for positions, delta in groups.values()
                ),
            )
            for name, groups in by_hook.items()
        ]


def _positions_key(positions: Any) -> str:
    return repr(positions)


def _adder(groups: list[tuple[Any, Tensor]]) -> Any:
    """Add each positions group's summed delta; "all" is a plain broadcast add."""

    def body(activation: Tensor, ctx: InjectionContext) -> Tensor:
        out = activation
        cloned = False
        seq_len = activation.shape[1]
        for positions, delta in groups:
            if positions == "all":
                out = out + delta
                cloned = True
                continue
            index = ctx.index(positions, seq_len, activation.device)
            if index is None:
                continue
            if not cloned:
                out = out.clone()
                cloned = True
            out[:, index] += delta
        return out

    return body


class GatedStrategy(Strategy):
    """Add s·Δ, gated by the activation's similarity to a stored key (a local memory)."""

    name = "gated"
    memory_model = GatedMemory

    def compile(self, memories: Sequence[Any], ctx: CompileContext) -> list[SiteHook]:
        import torch

        from meminject.tensorfile import read_tensors

        model = ctx.model
        banks: dict[tuple[str, str], list[tuple[Tensor, Tensor, float, float, int]]] = defaultdict(
            list
        )
        positions_of: dict[tuple[str, str], Any] = {}
        site_of: dict[str, tuple[str, int]] = {}
        for memory in memories:
            entry = ctx.entry(memory)
            _check_made_for(model, memory, entry, ctx)
            tensors = read_tensors(
                entry,
                memory.tensors,
                "tensors",
                ("key", "delta"),
                allow_outside=ctx.allow_outside_paths,
                also_finite_in=(model.dtype,),
            )
            shape = model.site_shape(memory.site)
            for name, tensor in tensors.items():
                if tuple(tensor.shape) != shape:
                    raise ctx.error(
                        memory,
                        f"tensor '{name}' has shape {tuple(tensor.shape)}, but site "
                        f"'{memory.site}' of this model needs {shape}",
                        "tensors",
                    )
            key = tensors["key"].flatten().to(torch.float32)
            if float(key.norm()) == 0.0:
                raise ctx.error(memory, "the key is all zeros; the gate is undefined", "tensors")
            delta = tensors["delta"].flatten().to(torch.float32)
            group = (hook_name(memory.site, memory.layer), repr(memory.positions))
            positions_of[group] = memory.positions
            site_of[group[0]] = (memory.site, memory.layer)
            code = GATES[memory.gate].code
            banks[group].append((key, delta, memory.gate_parameter, memory.hardness, code))
        hooks = []
        for (point, positions_key), bank in banks.items():
            keys = torch.stack([m[0] for m in bank]).to(model.device)
            deltas = torch.stack([m[1] for m in bank]).to(model.device)
            boundary = torch.tensor([m[2] for m in bank], device=model.device)
            hardness = torch.tensor([m[3] for m in bank], device=model.device)
            codes = [m[4] for m in bank]
            kinds = (
                torch.tensor(codes, dtype=torch.int64, device=model.device) if any(codes) else None
            )
            positions = positions_of[(point, positions_key)]
            body = gate_body(keys, deltas, boundary, hardness, positions, kinds)
            gate = Gate(*site_of[point], point, positions, keys, deltas, boundary, hardness, kinds)
            hooks.append(SiteHook(point, body, gates=(gate,)))
        return hooks


def _check_made_for(model: Any, memory: Any, entry: Any, ctx: CompileContext) -> None:
    info = entry.model_info
    if info is None:
        return
    if info.coordinates is not None and info.coordinates != model.coordinates:
        raise ctx.error(
            memory,
            f"made in '{info.coordinates}' coordinates, but the model is loaded in "
            f"'{model.coordinates}' (pass --coordinates {info.coordinates})",
            "tensors",
        )
    if info.fingerprint is not None and not model.made_for(info.fingerprint):
        made_for = f"'{info.name}'" if info.name else "another model"
        raise ctx.error(
            memory,
            f"made for {made_for} (fingerprint {info.fingerprint}), not the loaded model "
            f"'{model.name}' ({model.fingerprint_like(info.fingerprint)})",
            "tensors",
        )


@hookimpl
def register_strategies(register: Any) -> None:
    register("add", AddStrategy)
    register("gated", GatedStrategy)
