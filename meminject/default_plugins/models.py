"""Built-in model sources, registered through the same hook as plugins' models.

``toyworld`` is the embedded model (offline default); the real models are the sources
of :mod:`meminject.model_sources`, each with where its weights are and how to pull
them. Loading itself is :func:`meminject.loading.load_model`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meminject.errors import ModelLoadError
from meminject.hookspecs import hookimpl


def _toyworld_loader(device: str | None = None, dtype: str | None = None) -> Path:
    from meminject import toyworld

    weights = Path(toyworld.WEIGHTS_DIR)
    if not (weights / "model.safetensors").is_file():
        raise ModelLoadError(
            f"toyworld weights are missing from {weights}; run python -m meminject.toyworld.train"
        )
    return weights


@hookimpl
def register_models(register: Any) -> None:
    from meminject import model_sources

    register(
        "toyworld",
        _toyworld_loader,
        "Embedded GPT-2-architecture model trained on a synthetic world (offline default).",
        where=lambda: str(Path(__file__).parent.parent / "toyworld" / "weights"),
    )
    for source in model_sources.SOURCES.values():
        register(
            source.name,
            source.loader,
            source.description,
            where=source.where,
            prepend_bos=source.prepend_bos,
            pull=lambda echo=print, source=source: model_sources.pull(source, echo=echo),
        )
