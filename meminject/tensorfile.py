"""Tensor files next to memory files: where they may live, and how they are read.

Only safetensors is read (no pickle, no ``torch.load``). A path is relative to
its TOML file and must stay inside that file's directory after symlinks are
resolved, unless the caller explicitly allows outside paths: a downloaded memory
set must not be able to point meminject at arbitrary files.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from meminject.memfile import MemoryEntry

if TYPE_CHECKING:
    import torch

#: Largest tensor file read, in bytes (a 1,000-memory bank of GPT-2-XL width is ~13 MB).
MAX_TENSOR_BYTES = 1 << 30
#: Largest safetensors header read, in bytes.
MAX_HEADER_BYTES = 1 << 20


def resolve_path(
    entry: MemoryEntry, relative: str, field: str, *, allow_outside: bool = False
) -> Path:
    """The file a memory's relative path names, refused if it escapes the memory's folder."""
    raw = Path(relative)
    base = entry.file.parent.resolve()
    if not allow_outside:
        if raw.is_absolute():
            raise entry.error(
                f"absolute path '{relative}' is not allowed; use a path relative to the memory "
                "file (or pass --allow-outside-paths)",
                field,
            )
        if ".." in raw.parts:
            raise entry.error(
                f"path '{relative}' leaves the memory file's directory (or pass "
                "--allow-outside-paths)",
                field,
            )
    path = (base / raw).resolve() if not raw.is_absolute() else raw.resolve()
    if not allow_outside and not path.is_relative_to(base):
        raise entry.error(
            f"path '{relative}' resolves outside the memory file's directory through a symlink "
            "(or pass --allow-outside-paths)",
            field,
        )
    if not path.is_file():
        raise entry.error(f"tensor file '{relative}' does not exist", field)
    return path


def read_tensors(
    entry: MemoryEntry,
    relative: str,
    field: str,
    names: tuple[str, ...],
    *,
    allow_outside: bool = False,
) -> dict[str, torch.Tensor]:
    """Read exactly the tensors ``names`` from a safetensors file, checked and finite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_path(entry, relative, field, allow_outside=allow_outside)
    size = path.stat().st_size
    if size > MAX_TENSOR_BYTES:
        raise entry.error(
            f"tensor file '{relative}' is {size} bytes, over the {MAX_TENSOR_BYTES}-byte limit",
            field,
        )
    _check_header(entry, path, relative, field)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise entry.error(
            f"tensor file '{relative}' is not valid safetensors: {exc}", field
        ) from None
    missing = [n for n in names if n not in tensors]
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise entry.error(
            f"tensor file '{relative}' must hold exactly {', '.join(names)}; "
            + (f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"),
            field,
        )
    for name in names:
        tensor = tensors[name]
        if not tensor.is_floating_point():
            raise entry.error(
                f"tensor '{name}' in '{relative}' has dtype {tensor.dtype}; a float is needed",
                field,
            )
        if not bool(torch.isfinite(tensor).all()):
            raise entry.error(f"tensor '{name}' in '{relative}' holds NaN or inf", field)
    return {n: tensors[n] for n in names}


def _check_header(entry: MemoryEntry, path: Path, relative: str, field: str) -> None:
    """Refuse files that are not safetensors (a pickle, a .pt) before handing them on."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise entry.error(f"tensor file '{relative}' is not safetensors (too short)", field)
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > path.stat().st_size - 8:
            raise entry.error(
                f"tensor file '{relative}' is not safetensors (bad header length)", field
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise entry.error(
                f"tensor file '{relative}' is not safetensors (header is not JSON)", field
            ) from None
    if not isinstance(header, dict):
        raise entry.error(f"tensor file '{relative}' is not safetensors (bad header)", field)
