"""A memory set compiled once into plain data that vLLM's workers can rebuild hooks from.

vLLM runs the model in other processes (its engine core, and one worker per device), so
hooks cannot be handed over as Python closures: that would mean pickling code
(``VLLM_ALLOW_INSECURE_SERIALIZATION``). Instead meminject's own engine compiles the set
on a meminject-loaded copy of the checkpoint, exactly as for the ``hf`` backend, and the
result is reduced to what the hooks *compute*: for ``add`` memories the summed vector of
each (hook point, positions) group (:class:`meminject.extension.Addition`), for ``gated``
memories each bank's keys, deltas, boundaries and hardness
(:class:`meminject.extension.Gate`). Tensors travel as safetensors bytes, the rest as
JSON-like values; :mod:`meminject.vllm_backend.worker` rebuilds the hooks from that.

Which memories can run is decided per memory before anything is compiled, so a refusal
names every memory that cannot run and why, one line each (like ``meminject export``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError

if TYPE_CHECKING:
    from meminject.memfile import MemoryEntry, MemorySet
    from meminject.model_handle import LoadedModel

#: Sites the worker hooks on vLLM's Llama-family decoder layers (see
#: :mod:`meminject.vllm_backend.worker`). All but ``mlp_post`` are whole-width tensors on
#: every tensor-parallel rank (after the row-parallel all-reduce); ``mlp_post`` (the
#: down projection's input) is split across ranks, so it runs without tensor
#: parallelism only (:data:`UNSPLIT_SITES`).
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_post")
UNSPLIT_SITES = ("mlp_post",)

#: Sites an ``add`` memory may name because the add strategy lowers them onto
#: ``attn_out`` (a head's result, or a change routed through a head's value mix): in
#: blocks without a post-attention norm the heads' sum *is* the attention output.
LOWERED_ONTO_ATTN_OUT = ("attn_result", "attn_z")

#: ``config.json`` ``model_type`` values whose vLLM implementation is the Llama decoder
#: layer (``(hidden_states, residual)`` out, the residual add fused into the next norm)
#: and whose norms are RMSNorms, so the residual stream is the same in processed and
#: raw coordinates (processing folds RMSNorm gains without centring anything that writes
#: the stream; docs/architecture.md, "Coordinates"): memories compiled in either apply
#: unchanged to vLLM's raw weights.
FAMILIES = ("llama", "mistral")

STRATEGIES = ("add", "gated")

#: The ``format`` field of a plan file's metadata (``meminject export --format vllm``).
PLAN_FORMAT = "meminject-vllm-plan"
#: What ``vllm serve`` is started with to load plan files (:mod:`.vllm_serve`): the
#: directory's variable, the worker class and the logits processor that checks names.
PLANS_ENV = "MEMINJECT_VLLM_PLANS"
WORKER = "meminject.vllm_backend.vllm_serve.MemoryWorker"
CHOICE = "meminject.vllm_backend.vllm_serve:MemoryChoice"
#: A plan file's name (its stem) is what requests name in ``vllm_xargs``.
PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class NotRunnable(BadInputError):
    """Memories the vllm backend cannot run; ``problems`` has one line per memory."""

    def __init__(self, problems: list[str]):
        plural = "y" if len(problems) == 1 else "ies"
        super().__init__(
            f"{len(problems)} memor{plural} cannot run on the vllm backend: " + "; ".join(problems)
        )
        self.problems = problems


def refusal(entry: MemoryEntry, post_sublayer_norms: bool = False) -> str | None:
    """Why the vllm backend cannot run this memory, or None when it can."""
    memory = entry.memory
    strategy = memory.strategy
    if strategy not in STRATEGIES:
        return (
            f"it is a '{strategy}' memory, which compiles to Python code; the vllm backend "
            "runs only add and gated memories, rebuilt in its workers from data"
        )
    site = memory.resolved_site if strategy == "add" else memory.site
    if strategy == "add" and site in LOWERED_ONTO_ATTN_OUT and not post_sublayer_norms:
        return None
    if site not in SITES:
        return f"it is at site '{site}'; the vllm backend hooks only {', '.join(SITES)}" + (
            " (and, for add memories, attn_result / attn_z)" if strategy == "add" else ""
        )
    return None


def refusals(memory_set: MemorySet, post_sublayer_norms: bool = False) -> list[str]:
    """One ``file: memory: reason`` line per enabled memory the backend cannot run."""
    return [
        f"{entry.location().render()}: {reason}"
        for entry in memory_set.entries
        if entry.memory.enabled and (reason := refusal(entry, post_sublayer_norms)) is not None
    ]


def check_family(model_type: str | None, source: str) -> None:
    """Refuse a checkpoint whose vLLM decoder layers the worker does not know."""
    if model_type not in FAMILIES:
        raise BadInputError(
            f"the vllm backend runs memories on the Llama family ({', '.join(FAMILIES)}); "
            f"{source} is '{model_type}'"
        )


@dataclass
class MemoryPlan:
    """A compiled memory set as data: what the workers receive.

    ``hooks`` is one record per compiled change, in the order the ``hf`` backend runs
    them at a hook point: ``{"kind": "add" | "gate", "site", "layer", "positions",
    "tensors": {role: name}}``; ``tensors`` maps those names to float32 tensors.
    """

    hooks: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def payload(self) -> dict[str, Any]:
        """What ``collective_rpc`` sends: JSON-like records and safetensors bytes."""
        from safetensors.torch import save

        blob = save({k: v.contiguous() for k, v in self.tensors.items()}) if self.tensors else b""
        return {"hooks": self.hooks, "tensors": blob}

    def digest(self) -> str | None:
        """A hash of everything the hooks compute (None for an empty plan): the prefix
        cache salt of requests run under this plan, so keys and values computed under one
        memory set are never reused under another."""
        if not self.hooks:
            return None
        h = hashlib.sha256(json.dumps(self.hooks, sort_keys=True).encode())
        for name in sorted(self.tensors):
            h.update(name.encode())
            h.update(self.tensors[name].float().contiguous().numpy().tobytes())
        return "meminject-" + h.hexdigest()[:32]

    def save(
        self,
        path: Path | str,
        *,
        model: str,
        d_model: int,
        n_layers: int,
        overwrite: bool = False,
    ) -> str:
        """Write the plan as a safetensors file that vLLM's workers load as data
        (:func:`read_plan_file`): the tensors, and in its metadata the hook records, the
        digest (the requests' ``cache_salt``) and the model it was compiled for.
        Returns the digest."""
        from safetensors.torch import save

        from meminject.atomic import write_bytes_atomic

        digest = self.digest()
        if digest is None:
            raise BadInputError("no enabled memory to export")
        metadata = {
            "format": PLAN_FORMAT,
            "version": "1",
            "hooks": json.dumps(self.hooks, sort_keys=True),
            "digest": digest,
            "model": model,
            "d_model": str(d_model),
            "n_layers": str(n_layers),
        }
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        write_bytes_atomic(Path(path), save(tensors, metadata=metadata), overwrite=overwrite)
        return digest


def _positions(positions: Any) -> Any:
    return positions if isinstance(positions, str) else [int(p) for p in positions]


def compile_plan(
    model: LoadedModel, memories: Any, *, allow_outside_paths: bool = False
) -> MemoryPlan:
    """Compile ``memories`` (a set, paths or tables, as
    :func:`meminject.engine.compile_memories` takes) with meminject's engine on ``model``
    and keep the data.

    Refuses, before compiling, every memory the backend cannot run (one line each)."""
    from meminject.engine import as_memory_set, compile_memories

    memory_set = as_memory_set(memories)
    problems = refusals(memory_set, model.post_sublayer_norms)
    if problems:
        raise NotRunnable(problems)
    plan = MemoryPlan()
    for compiled in compile_memories(model, memory_set, allow_outside_paths=allow_outside_paths):
        hook = compiled.hook
        if not hook.additions and not hook.gates:  # pragma: no cover - refused above
            raise BadInputError(f"hook '{hook.hook_name}' is neither an addition nor a gate")
        for addition in hook.additions:
            site = "attn_out" if addition.site == "attn_heads_sum" else addition.site
            name = f"t{len(plan.tensors)}"
            plan.tensors[name] = addition.vector.detach().float().cpu()
            plan.hooks.append(
                {
                    "kind": "add",
                    "site": site,
                    "layer": addition.layer,
                    "positions": _positions(addition.positions),
                    "tensors": {"vector": name},
                }
            )
        for gate in hook.gates:
            names = {}
            for role in ("keys", "deltas", "boundary", "hardness", "kinds"):
                if getattr(gate, role) is None:
                    continue
                name = f"t{len(plan.tensors)}"
                plan.tensors[name] = getattr(gate, role).detach().float().cpu()
                names[role] = name
            plan.hooks.append(
                {
                    "kind": "gate",
                    "site": gate.site,
                    "layer": gate.layer,
                    "positions": _positions(gate.positions),
                    "tensors": names,
                }
            )
    for record in plan.hooks:
        if record["site"] not in SITES:  # pragma: no cover - refused above
            raise BadInputError(f"compiled to site '{record['site']}', which vllm cannot hook")
    return plan


def read_plan_file(path: Path | str) -> tuple[MemoryPlan, dict[str, str]]:
    """A plan file written by :meth:`MemoryPlan.save`, and its metadata. Raises
    :class:`BadInputError` naming the file for anything else."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError) as exc:
        raise BadInputError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != PLAN_FORMAT or meta.get("version") != "1":
        raise BadInputError(
            f"{path}: not a meminject vLLM plan (write one with meminject export --format vllm)"
        )
    try:
        hooks = json.loads(meta["hooks"])
        int(meta["d_model"]), int(meta["n_layers"])
    except (KeyError, ValueError) as exc:
        raise BadInputError(f"{path}: its plan metadata is damaged ({exc})") from None
    for record in hooks:
        if record.get("site") not in SITES or record.get("kind") not in ("add", "gate"):
            raise BadInputError(f"{path}: a hook record names an unknown site or kind")
        for name in record.get("tensors", {}).values():
            if name not in tensors:
                raise BadInputError(f"{path}: tensor '{name}' is missing")
    plan = MemoryPlan(hooks=hooks, tensors={k: v.float() for k, v in tensors.items()})
    if plan.digest() != meta.get("digest"):
        raise BadInputError(f"{path}: its digest does not match its contents")
    return plan, meta


def plan_files(directory: Path | str) -> dict[str, Path]:
    """The plan files of a directory by name (the file's stem): what ``vllm serve``'s
    requests name in ``vllm_xargs``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInputError(f"{directory}: no such directory of meminject vLLM plans")
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        name = path.name[: -len(".safetensors")]
        if PLAN_NAME.fullmatch(name):
            found[name] = path
    return found
