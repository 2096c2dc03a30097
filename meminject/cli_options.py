"""Click options shared by the command modules (light: click only)."""

from __future__ import annotations

from typing import Any

import click


def model_options(f: Any) -> Any:
    """--device, --dtype, --coordinates and --prepend-bos, as every model-loading command
    takes them."""
    f = click.option(
        "--prepend-bos/--no-prepend-bos",
        "prepend_bos",
        default=None,
        help="Put the BOS token before prompts (default: the memory files' [model], else "
        "the model source's convention; TransformerLens's 'prepend' for other models).",
    )(f)
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


def load_cli_model(
    model_name: str | None,
    memory_set: Any,
    device: str | None,
    dtype: str | None,
    coordinates: str | None,
    prepend_bos: bool | None,
) -> Any:
    """The model a command runs on: ``--model``, else the files' ``[model] name``, else
    toyworld; coordinates and BOS from the flags, else the files' ``[model]`` table."""
    from meminject.models import load_model

    info = memory_set.model_info() if memory_set is not None else None
    name = model_name or (info.name if info and info.name else None) or "toyworld"
    coords = coordinates or (info.coordinates if info and info.coordinates else "processed")
    if prepend_bos is None and info is not None:
        prepend_bos = info.prepend_bos
    return load_model(name, device=device, dtype=dtype, coordinates=coords, prepend_bos=prepend_bos)
