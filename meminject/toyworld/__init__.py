"""toyworld: the small model that ships with meminject, and the world it was trained on.

Why it exists: meminject must run offline on a fresh machine (docs/toyworld.md). toyworld is a
GPT-2-architecture model trained by :mod:`meminject.toyworld.train` on single-hop facts
about invented countries plus two-hop sentences for some of them; the two-hop prompts of
the other countries are held out and collected in ``dataset.csv`` in the paper's columns,
so the paper's experiment (inject the bridge entity, watch the answer's probability rise)
can be run on it.

Importing this package is cheap: no torch or transformers import happens here; the
model's answer metrics are :func:`meminject.toyworld.metrics.evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .world import World

#: Hugging Face model directory of the shipped model (config, safetensors, tokenizer,
#: ``world.json`` and ``dataset.csv``).
WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"

#: Name under which the model is known to the rest of meminject.
MODEL_NAME = "toyworld"


def dataset_path(model_dir: str | Path | None = None) -> Path:
    """Path of the held-out two-hop CSV (paper columns) of ``model_dir`` (default shipped)."""
    return Path(model_dir or WEIGHTS_DIR) / "dataset.csv"


def world_path(model_dir: str | Path | None = None) -> Path:
    """Path of ``world.json`` of ``model_dir`` (default shipped)."""
    return Path(model_dir or WEIGHTS_DIR) / "world.json"


def load_world(path: str | Path | None = None) -> World:
    """Load the world a model was trained on from its ``world.json``.

    ``path`` may be the JSON file or a model directory; default: the shipped model's.
    """
    from .world import World

    p = Path(path) if path is not None else world_path()
    if p.is_dir():
        p = p / "world.json"
    return World.from_json_dict(json.loads(p.read_text(encoding="utf-8")))


__all__ = ["MODEL_NAME", "WEIGHTS_DIR", "dataset_path", "load_world", "world_path"]
