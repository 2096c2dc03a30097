"""The worker extension vLLM mixes into each of its workers: hooks rebuilt from data.

``LLM(..., worker_extension_cls="meminject.vllm_backend.worker.MemoryWorkerExtension")``
makes vLLM add this class's methods to every worker; ``LLM.collective_rpc(name, args)``
calls them by name with plain data (:meth:`MemoryPlan.payload
<meminject.vllm_backend.plan.MemoryPlan.payload>`). No code crosses the wire: the only
code that runs in the workers is this module's, imported by name. Inside ``vllm serve``,
:mod:`meminject.vllm_backend.vllm_serve`'s worker class carries the same methods and
installs plan files itself once the model has loaded.

Where each site is hooked on vLLM's Llama decoder layer, which returns
``(hidden_states, residual)`` and leaves the residual add to the next layer's fused
norm (so the residual stream at a layer boundary is ``hidden_states + residual``):

* ``resid_pre``: a pre-hook on the layer; the stream is ``hidden_states + residual``
  (``hidden_states`` alone at layer 0, where ``residual`` is None); the change is added
  to ``hidden_states``, which the layer's fused norm adds into the stream.
* ``attn_out``: a hook on ``self_attn``'s output (after ``o_proj``, a row-parallel
  linear that all-reduces, so every tensor-parallel rank sees the whole output and adds
  the same change once to the replicated stream).
* ``resid_mid``: a pre-hook on ``post_attention_layernorm``, whose arguments are the
  attention output and the residual: the stream is their sum, and the change is added to
  the attention output, so it reaches both the MLP's input and the stream after the
  block, as ``resid_mid`` does in TransformerLens.
* ``mlp_out``: a hook on ``mlp``'s output (after the all-reducing ``down_proj``).
* ``mlp_post``: a pre-hook on ``mlp.down_proj``, whose input is the MLP's hidden
  activation. Under tensor parallelism that input is split across ranks (a gate's
  dot product would need the whole of it), so the worker refuses it there.
* ``resid_post``: a hook on the layer's output; the stream is ``hidden_states +
  residual`` and the change is added to ``hidden_states``.

Positions follow each request: a pre-hook on the first decoder layer reads the step's ``positions``
(each token's absolute position in its own sequence) and, from the model runner, how
many tokens of the step belong to each request (``query_start_loc``, in the order of
``input_batch``) and each request's prompt length, so ``prompt``, ``generated``,
``last`` and explicit lists mean what they mean in meminject's own loop
(:meth:`meminject.extension.InjectionContext.index`), with chunked prefill and
continuous batching alike.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

#: Method names are prefixed: they share the worker's namespace with vLLM's own.
_STATE = "_meminject_state"


class _StepLayout:
    """Each token's absolute position, its request's prompt length and the number of the
    memory plan its request runs (0: none), for this step."""

    def __init__(self) -> None:
        self.positions: Any = None
        self.prompt_len: Any = None
        self.plan: Any = None


def _position_mask(mode: Any, layout: _StepLayout) -> Any:
    """A boolean mask over the step's tokens, or None for every token."""
    import torch

    if mode == "all":
        return None
    pos, plen = layout.positions, layout.prompt_len
    if mode == "prompt":
        return pos < plen
    if mode == "generated":
        return pos >= plen
    if mode == "last":
        return pos == plen - 1
    mask = torch.zeros_like(pos, dtype=torch.bool)
    for p in mode:
        mask |= pos == (plen + p if p < 0 else p)
    return mask


def _update(parts: list[dict[str, Any]], activation: Any, layout: _StepLayout) -> Any:
    """The total change the parts make to ``activation`` ([tokens, width]), applied in
    turn as the ``hf`` backend chains them (each gate reads the activation as the parts
    before it left it)."""
    import torch

    from meminject.gates import gate_values

    total = torch.zeros_like(activation)
    for part in parts:
        mask = _position_mask(part["positions"], layout)
        mine = layout.plan == part["plan"]
        mask = mine if mask is None else mask & mine
        if mask.device != activation.device:
            mask = mask.to(activation.device)
        if part["kind"] == "add":
            vector = part["vector"].to(activation.dtype)
            total = total + mask.unsqueeze(-1).to(activation.dtype) * vector
            continue
        rows = (activation + total)[mask]
        if rows.shape[0] == 0:
            continue
        gates = gate_values(
            rows.float(), part["keys"], part["boundary"], part["hardness"], part.get("kinds")
        )
        total = total.clone()
        total[mask] += (gates @ part["deltas"]).to(activation.dtype)
    return total


class MemoryWorkerExtension:
    """Methods vLLM adds to each worker (``worker_extension_cls``).

    The worker holds memory plans by key; a request runs the plan its
    ``SamplingParams.extra_args["meminject"]`` names (``""``: none), or the default plan
    when it names none. Plans are added and dropped between steps (``collective_rpc``
    calls run between the engine's steps), and every change rebuilds the hooks."""

    model_runner: Any  # set by vLLM's worker

    def meminject_set(self, plans: dict[str, dict[str, Any]], default: str | None) -> int:
        """Replace the installed plans by ``plans`` (key → payload) and make ``default``
        the plan of requests that name none. Returns the number of changes installed."""
        self._meminject_plans: dict[str, list[tuple[str, int, dict[str, Any]]]] = {}
        self._meminject_default = default
        return self.meminject_add(plans)

    def meminject_add(self, plans: dict[str, dict[str, Any]]) -> int:
        """Add (or replace) plans, keeping the others. Returns the number of changes
        installed in all."""
        from safetensors.torch import load

        device = next(self._meminject_model().parameters()).device
        held = self._meminject_held()
        for key, payload in plans.items():
            blob = bytes(payload.get("tensors") or b"")
            tensors = {k: v.to(device) for k, v in load(blob).items()} if blob else {}
            held[key] = _parts(payload.get("hooks") or [], tensors)
        return self._meminject_rebuild()

    def meminject_drop(self, keys: list[str]) -> int:
        """Remove plans (requests must no longer name them). Returns the number of
        changes still installed."""
        held = self._meminject_held()
        for key in keys:
            held.pop(key, None)
        return self._meminject_rebuild()

    def meminject_load_files(self, directory: str) -> list[str]:
        """Add every plan file of ``directory`` (``meminject export --format vllm``)
        under its name, checked against the model. Returns the names."""
        from meminject.vllm_backend.plan import plan_files, read_plan_file

        model = self._meminject_model()
        layers = model.model.layers
        width = model.config.hidden_size if hasattr(model, "config") else None
        payloads = {}
        for name, path in plan_files(directory).items():
            plan, meta = read_plan_file(path)
            if int(meta["n_layers"]) != len(layers) or (
                width is not None and int(meta["d_model"]) != int(width)
            ):
                raise RuntimeError(
                    f"meminject: {path} was compiled for {meta.get('model')} "
                    f"({meta['n_layers']} layers, width {meta['d_model']}), not this model "
                    f"({len(layers)} layers, width {width})"
                )
            payloads[name] = plan.payload()
        self.meminject_add(payloads)
        return sorted(payloads)

    def meminject_clear(self) -> None:
        """Remove every plan and hook."""
        self._meminject_plans = {}
        self._meminject_default = None
        self._meminject_rebuild()

    def meminject_count(self) -> int:
        """How many hook handles are installed (the layout hook included)."""
        return len(getattr(self, _STATE, None) or ())

    def meminject_keys(self) -> list[str]:
        """The keys of the installed plans."""
        return sorted(self._meminject_held())

    # -- inside the worker ----------------------------------------------------------

    def _meminject_held(self) -> dict[str, list[tuple[str, int, dict[str, Any]]]]:
        if getattr(self, "_meminject_plans", None) is None:
            self._meminject_plans = {}
        plans: dict[str, list[tuple[str, int, dict[str, Any]]]] = self._meminject_plans
        return plans

    def _meminject_model(self) -> Any:
        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise RuntimeError(
                f"meminject: {type(model).__name__} has no model.layers; the vllm backend "
                "hooks Llama-family decoder layers"
            )
        return model

    def _meminject_rebuild(self) -> int:
        """Remove the hooks and install those of the held plans."""
        for handle in getattr(self, _STATE, None) or ():
            handle.remove()
        setattr(self, _STATE, [])
        held = self._meminject_held()
        default = getattr(self, "_meminject_default", None)
        if not any(held.values()):
            return 0
        runner = self.model_runner
        layers = self._meminject_model().model.layers
        for attr in ("input_batch", "query_start_loc", "requests"):
            if not hasattr(runner, attr):
                raise RuntimeError(f"meminject: vLLM's model runner has no '{attr}'")
        # Plan 0 is "no memories"; the others are numbered in key order.
        index = {key: i for i, key in enumerate(sorted(held), start=1)}
        if default is not None and default not in index:
            raise RuntimeError(f"meminject: the default plan '{default}' is not among the plans")
        by_point: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        count = 0
        for key in sorted(held):
            for site, layer, part in held[key]:
                if not 0 <= layer < len(layers):
                    raise RuntimeError(f"meminject: layer {layer} is not in this model")
                by_point[(site, layer)].append({**part, "plan": index[key]})
                count += 1
        layout = _StepLayout()
        # The step's layout is read at the first decoder layer (whose first argument is
        # the positions), not on the model: vLLM's compile decorator replaces the model's
        # __call__, which skips module hooks. Registered first, it runs before any
        # memory's pre-hook on that layer.
        hook = _layout_hook(runner, layout, index, index[default] if default else 0)
        handles = [layers[0].register_forward_pre_hook(hook, with_kwargs=True)]
        for (site, layer), parts in by_point.items():
            handles.append(_install(layers[layer], site, parts, layout))
        setattr(self, _STATE, handles)
        return count


def _parts(
    hooks: list[dict[str, Any]], tensors: dict[str, Any]
) -> list[tuple[str, int, dict[str, Any]]]:
    """A plan's records as (site, layer, part) with their tensors, in the plan's order."""
    parts = []
    for record in hooks:
        part: dict[str, Any] = {"kind": record["kind"], "positions": record["positions"]}
        for role, name in record["tensors"].items():
            part[role] = tensors[name]
        parts.append((str(record["site"]), int(record["layer"]), part))
    return parts


def _layout_hook(runner: Any, layout: _StepLayout, index: dict[str, int], default: int) -> Any:
    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import numpy as np
        import torch

        positions = kwargs.get("positions", args[0] if args else None)
        if positions is None:
            raise RuntimeError("meminject: the model was called without positions")
        n = positions.shape[-1]
        num_reqs = runner.input_batch.num_reqs
        starts = np.asarray(runner.query_start_loc.np[: num_reqs + 1])
        counts = np.diff(starts)
        prompt_lens = np.asarray(runner.input_batch.num_prompt_tokens[:num_reqs])
        per_token = np.repeat(prompt_lens, counts)
        if per_token.shape[0] > n:
            raise RuntimeError(
                f"meminject: the step has {n} tokens but its requests schedule {per_token.shape[0]}"
            )
        full = np.full(n, -1, dtype=np.int64)  # padding rows: never "prompt" or "last"
        full[: per_token.shape[0]] = per_token
        plans = np.zeros(n, dtype=np.int64)  # padding rows: no plan
        plans[: per_token.shape[0]] = np.repeat(
            np.array(
                [
                    _plan_of(runner, rid, index, default)
                    for rid in runner.input_batch.req_ids[:num_reqs]
                ],
                dtype=np.int64,
            ),
            counts,
        )
        layout.positions = positions.reshape(-1)[:n].long()
        layout.prompt_len = torch.from_numpy(full).to(positions.device)
        layout.plan = torch.from_numpy(plans).to(positions.device)

    return hook


def _plan_of(runner: Any, req_id: str, index: dict[str, int], default: int) -> int:
    """The plan a request runs: the one its ``extra_args["meminject"]`` names, else the
    default."""
    state = runner.requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    key = extra.get("meminject")
    if key is None:
        return default
    if key == "":
        return 0
    if key not in index:
        raise RuntimeError(f"meminject: request {req_id} names memory plan '{key}', not installed")
    return index[key]


def _install(layer: Any, site: str, parts: list[dict[str, Any]], layout: _StepLayout) -> Any:
    if site in ("attn_out", "mlp_out"):
        module = layer.self_attn if site == "attn_out" else layer.mlp

        def on_output(module: Any, args: Any, output: Any) -> Any:
            return output + _update(parts, output, layout)

        return module.register_forward_hook(on_output)
    if site == "mlp_post":
        down = layer.mlp.down_proj
        full, local = (
            getattr(down, "input_size", None),
            getattr(down, "input_size_per_partition", None),
        )
        if full is not None and local is not None and full != local:
            raise RuntimeError(
                "meminject: mlp_post memories do not run under tensor parallelism (the MLP's "
                "hidden activation is split across ranks)"
            )

        def on_hidden(module: Any, args: tuple[Any, ...]) -> Any:
            hidden = args[0]
            return (hidden + _update(parts, hidden, layout), *args[1:])

        return down.register_forward_pre_hook(on_hidden)
    if site == "resid_post":

        def on_layer_output(module: Any, args: Any, output: Any) -> Any:
            hidden, residual = output
            stream = hidden if residual is None else hidden + residual
            return hidden + _update(parts, stream, layout), residual

        return layer.register_forward_hook(on_layer_output)
    if site in ("resid_pre", "resid_mid"):
        # resid_pre: the layer's (positions, hidden_states, residual);
        # resid_mid: the post-attention norm's (attention output, residual).
        module = layer if site == "resid_pre" else layer.post_attention_layernorm
        names = (
            ("positions", "hidden_states", "residual") if site == "resid_pre" else ("x", "residual")
        )
        first = 1 if site == "resid_pre" else 0

        def on_input(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            values = list(args)
            hidden = values[first] if len(values) > first else kwargs[names[first]]
            if len(values) > first + 1:
                residual = values[first + 1]
            else:
                residual = kwargs.get(names[first + 1], kwargs.get("residual"))
            stream = hidden if residual is None else hidden + residual
            changed = hidden + _update(parts, stream, layout)
            if len(values) > first:
                values[first] = changed
            else:
                kwargs = {**kwargs, names[first]: changed}
            return tuple(values), kwargs

        return module.register_forward_pre_hook(on_input, with_kwargs=True)
    raise RuntimeError(f"meminject: site '{site}' is not hooked by the vllm backend")
