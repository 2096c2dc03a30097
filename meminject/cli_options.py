"""Click options shared by the command modules (light: click only)."""

from __future__ import annotations

from typing import Any

import click


def model_options(f: Any) -> Any:
    """--device, --dtype and --coordinates, as every model-loading command takes them."""
    f = click.option(
        "--coordinates",
        type=click.Choice(["processed", "raw"]),
        default=None,
        help="Weight coordinates: processed (the paper's HookedTransformer: LayerNorm folded, "
        "weights centred) or raw (default: the memory files' [model], else processed).",
    )(f)
    f = click.option(
        "--dtype",
        type=click.Choice(["float32", "float16", "bfloat16"]),
        default=None,
        help="Model dtype (default float32).",
    )(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: auto).")(f)
    return f
