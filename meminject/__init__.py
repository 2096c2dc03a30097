"""meminject: memories for language models at inference time.

The public API is re-exported lazily so that ``import meminject`` (and the
light CLI paths) never import torch or transformer_lens::

    import meminject
    model = meminject.load_model("toyworld")
    memories = meminject.load_memories(["memories/toyworld/"])
    print(meminject.generate(model, "The capital of ... is", memories).completion)
    with meminject.inject(model, memories):
        logits = model.bridge(model.to_tokens("..."))
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "meminject.loading",
    "LoadedModel": "meminject.model_handle",
    "load_memories": "meminject.loading",
    "MemorySet": "meminject.memfile",
    "inject": "meminject.engine",
    "compile_memories": "meminject.engine",
    "generate": "meminject.generation",
    "Generation": "meminject.generation",
    "generate_batch": "meminject.generation",
    "DecodeOptions": "meminject.generation",
    "MeminjectError": "meminject.errors",
    "MemoryFileError": "meminject.errors",
    "hookimpl": "meminject.hookspecs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'meminject' has no attribute {name!r}")
    module = import_module(_EXPORTS[name])
    return getattr(module, name)
