"""Backends: what runs a model's forward passes, with memories' hooks at their sites.

The decoding loop (:mod:`meminject.generation`) only talks to the :class:`Backend`
protocol, so it has no branch per backend. Backends are registered through the
``register_backends`` plugin hook like everything else; the built-ins
(:mod:`meminject.default_plugins.backends`) are

* ``hf``: the plain Hugging Face modules, sharing the bridge's weight tensors (one copy
  of the weights), hooked only at the memories' sites (:mod:`meminject.backends.hf`);
* ``bridge``: TransformerLens's ``TransformerBridge``, which serves every hook point,
  per-head ones included (:mod:`meminject.backends.bridge`).

A backend states which hook points it can serve (``unsupported``) and what else it can
do (``features``); ``auto`` picks the first backend registered with ``auto=True`` that
serves every hook point a generation needs, and says why the others were passed over.

Importing this module is cheap (no torch): backend factories, the built-ins' included,
import it to build their backends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from meminject.errors import BadInputError

if TYPE_CHECKING:
    from jaxtyping import Float, Int
    from torch import Tensor

    from meminject.model_handle import LoadedModel
    from meminject.plugins import Registry

#: A hook body in bridge (processed or raw, as loaded) coordinates: activation in, out.
Body = Callable[["Tensor"], "Tensor"]

#: Features a backend may declare. ``kv_cache``: ``forward`` takes and returns a cache;
#: ``padded_batch``: ``forward`` honours ``attention_mask`` and ``position_ids``, so
#: left-padded rows compute what each would alone; ``python_hooks``: ``hooks`` runs
#: arbitrary bodies; ``declarative_add``: it can take ``add`` memories as data
#: (:class:`meminject.extension.Addition`) without running Python in the forward.
FEATURES = frozenset({"kv_cache", "padded_batch", "python_hooks", "declarative_add"})


class BackendUnavailable(BadInputError):
    """A backend cannot run this model or these hook points; the message says why."""


@dataclass(frozen=True)
class Step:
    """What one forward of the decoding loop runs; new fields may be added later."""

    #: The new tokens only when ``past`` holds the earlier ones, else the whole sequence.
    tokens: Int[Tensor, "batch pos"]
    #: The cache the previous step returned (None on the first step or without a cache).
    past: Any = None
    use_cache: bool = True
    #: Covers every token so far (cached ones included); None for a batch without padding.
    attention_mask: Int[Tensor, "batch total"] | None = None
    #: Each token's position in its own row; None for a batch without padding.
    position_ids: Int[Tensor, "batch pos"] | None = None


@runtime_checkable
class Backend(Protocol):
    """The contract between the decoding loop and what runs the model."""

    #: The name it is registered under (``hf``, ``bridge``, a plugin's).
    name: str
    #: A subset of :data:`FEATURES`.
    features: frozenset[str]

    def unsupported(self, hook_name: str) -> str | None:
        """Why this backend cannot serve ``hook_name`` (a TransformerLens hook point such
        as ``blocks.3.hook_attn_out``), or None when it can, with the activation a body
        sees there equal to the bridge's."""
        ...

    def hooks(self, bodies: Mapping[str, Body]) -> AbstractContextManager[None]:
        """Install ``bodies`` (hook point → body) for the duration of the block, and
        remove them when it ends, also by an exception."""
        ...

    def forward(self, step: Step) -> tuple[Float[Tensor, "batch pos d_vocab"], Any]:
        """Logits for ``step.tokens`` and the cache to pass next time (None without
        ``step.use_cache``)."""
        ...


#: ``auto`` is not a backend but a choice among those registered with ``auto=True``.
AUTO = "auto"


def backend_names(registry: Registry | None = None) -> list[str]:
    """``auto`` followed by every registered backend, for help texts and errors."""
    from meminject.plugins import get_registry

    registry = registry or get_registry()
    return [AUTO, *registry.backends]


def get_backend(model: LoadedModel, name: str, registry: Registry | None = None) -> Backend:
    """The backend ``name`` for ``model``, built on first use and kept on the model (a
    backend that could not be built is remembered with its reason)."""
    from meminject.plugins import get_registry

    registry = registry or get_registry()
    entry = registry.backends.get(name)
    if entry is None:
        raise BadInputError(
            f"unknown backend '{name}'; choose one of {', '.join(backend_names(registry))}"
        )
    cached = model.backends.get(name)
    if isinstance(cached, str):
        raise BackendUnavailable(cached)
    if cached is not None:
        return cached
    try:
        backend = entry.factory(model)
    except BackendUnavailable as exc:
        model.backends[name] = str(exc)
        raise
    if not isinstance(backend, Backend) or not backend.features <= FEATURES:
        from meminject.errors import PluginError

        raise PluginError(
            entry.plugin,
            f"backend '{name}': its factory returned {type(backend).__name__}, which does "
            "not implement meminject.backends.Backend (name, features ⊆ FEATURES, "
            "unsupported, hooks, forward)",
        )
    model.backends[name] = backend
    return backend


def select_backend(
    model: LoadedModel,
    hook_names: list[str],
    name: str = AUTO,
    registry: Registry | None = None,
) -> tuple[Backend, str | None]:
    """The backend to run ``hook_names`` with, and, under ``auto``, why backends tried
    before it were passed over (None when the first choice served)."""
    from meminject.plugins import get_registry

    registry = registry or get_registry()
    if name != AUTO:
        backend = _try(model, name, hook_names, registry)
        if isinstance(backend, str):
            raise BackendUnavailable(f"the {name} backend cannot run this: {backend}")
        return backend, None
    notes: list[str] = []
    for entry in registry.backends.values():
        if not entry.auto:
            continue
        found = _try(model, entry.name, hook_names, registry)
        if not isinstance(found, str):
            return found, "; ".join(notes) or None
        notes.append(f"{entry.name}: {found}")
    raise BackendUnavailable("no backend can run this (" + "; ".join(notes) + ")")


def _try(model: LoadedModel, name: str, hook_names: list[str], registry: Registry) -> Any:
    try:
        backend = get_backend(model, name, registry)
    except BackendUnavailable as exc:
        return str(exc)
    for hook_name in hook_names:
        reason = backend.unsupported(hook_name)
        if reason is not None:
            return reason
    return backend


__all__ = [
    "AUTO",
    "FEATURES",
    "Backend",
    "BackendUnavailable",
    "Body",
    "Step",
    "backend_names",
    "get_backend",
    "select_backend",
]
