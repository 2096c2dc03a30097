"""dtype names: the one list the CLI, the API, served snapshots and checks share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meminject.errors import BadInputError

if TYPE_CHECKING:
    import torch

#: The dtypes a model loads in, by the names the CLI, the API and snapshots use.
DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype: str | None) -> torch.dtype:
    """The torch dtype named ``dtype`` (float32 when None); a BadInputError otherwise."""
    import torch

    name = dtype or "float32"
    if name not in DTYPES:
        raise BadInputError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    dtype_obj: torch.dtype = getattr(torch, name)
    return dtype_obj


def dtype_name(dtype: torch.dtype) -> str:
    """The name :func:`resolve_dtype` takes for ``dtype`` (``torch.bfloat16`` → bfloat16)."""
    return str(dtype).removeprefix("torch.")
