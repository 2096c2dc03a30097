"""Built-in backends, registered through the same hook as plugins' backends.

``hf`` (:mod:`meminject.backends.hf`) and ``bridge`` (:mod:`meminject.backends.bridge`),
both with ``auto=True``, ``hf`` first, so ``auto`` tries it first. The protocol they
implement and the choice among backends are :mod:`meminject.backends`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meminject.hookspecs import hookimpl

if TYPE_CHECKING:
    from meminject.backends import Backend
    from meminject.model_handle import LoadedModel


def _hf_factory(model: LoadedModel) -> Backend:
    from meminject.backends.hf import HFBackend

    return HFBackend.build(model)


def _bridge_factory(model: LoadedModel) -> Backend:
    from meminject.backends.bridge import BridgeBackend

    return BridgeBackend(model)


@hookimpl
def register_backends(register: Any) -> None:
    register(
        "hf",
        _hf_factory,
        "Plain Hugging Face modules sharing the bridge's weights, hooked only at the "
        "memories' sites (fastest; every site verified against the bridge on a probe).",
        auto=True,
    )
    register(
        "bridge",
        _bridge_factory,
        "TransformerLens's TransformerBridge: every hook point, per-head ones included.",
        auto=True,
    )
