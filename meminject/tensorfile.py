"""Tensor files next to memory files: where they may live, and how they are read.

Only safetensors is read (no pickle, no ``torch.load``). A path is relative to
its TOML file and must stay inside that file's directory after symlinks are
resolved, unless the caller explicitly allows outside paths: a downloaded memory
set must not be able to point meminject at arbitrary files.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject import dtypes
from meminject.errors import shorten
from meminject.fsread import FS_ERRORS, fs_reason
from meminject.memfile import MemoryEntry, structure_problem

if TYPE_CHECKING:
    import torch

#: Largest tensor file read, in bytes (a 1,000-memory bank of GPT-2-XL width is ~13 MB).
MAX_TENSOR_BYTES = 1 << 30
#: Largest safetensors header read, in bytes.
MAX_HEADER_BYTES = 1 << 20

#: safetensors dtype → torch's name. Only the first four are read: the gate computes in
#: float32, and float8 (or narrower) values cannot be checked or used as they are.
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F6_E2M3": "float6_e2m3fn",
    "F6_E3M2": "float6_e3m2fn",
    "F4": "float4_e2m1fn_x2",
}
_READ_DTYPES = ("F64", "F32", "F16", "BF16")
_INTEGER_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")
_USE = "use float32, float16 or bfloat16"


def resolve_path(
    entry: MemoryEntry, relative: str, field: str, *, allow_outside: bool = False
) -> Path:
    """The file a memory's relative path names, refused if it escapes the memory's folder.

    A name the file system cannot take (a NUL byte, too long, a symbolic link loop) is an
    error naming the memory and field, like a missing file."""
    shown = shorten(relative)
    raw = Path(relative)
    if not allow_outside:
        if raw.is_absolute():
            raise entry.error(
                f"absolute path '{shown}' is not allowed; use a path relative to the memory "
                "file (or pass --allow-outside-paths)",
                field,
            )
        if ".." in raw.parts:
            raise entry.error(
                f"path '{shown}' leaves the memory file's directory (or pass "
                "--allow-outside-paths)",
                field,
            )
    try:
        base = entry.file.parent.resolve()
        path = (base / raw).resolve() if not raw.is_absolute() else raw.resolve()
        if not allow_outside and not path.is_relative_to(base):
            raise entry.error(
                f"path '{shown}' resolves outside the memory file's directory through a "
                "symlink (or pass --allow-outside-paths)",
                field,
            )
        path.stat()  # is_file() would hide a loop or a name too long as "does not exist"
    except FileNotFoundError:
        raise entry.error(f"tensor file '{shown}' does not exist", field) from None
    except FS_ERRORS as exc:
        raise entry.error(f"tensor file '{shown}': {fs_reason(exc)}", field) from None
    if not path.is_file():
        raise entry.error(f"tensor file '{shown}' is not a regular file", field)
    return path


def read_tensors(
    entry: MemoryEntry,
    relative: str,
    field: str,
    names: tuple[str, ...],
    *,
    allow_outside: bool = False,
    dtype: torch.dtype | None = None,
    also_finite_in: Sequence[torch.dtype] = (),
) -> dict[str, torch.Tensor]:
    """Read exactly the tensors ``names`` from a safetensors file, checked, converted to
    ``dtype`` (default float32, what the gate computes in) and finite: before the cast,
    after it, and after a cast to each of ``also_finite_in`` (the model's dtype, for
    example), so a value that only overflows in a narrower dtype is refused here too."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    shown = shorten(relative)
    path = resolve_path(entry, relative, field, allow_outside=allow_outside)
    try:
        size = path.stat().st_size
        if size > MAX_TENSOR_BYTES:
            raise entry.error(
                f"tensor file '{shown}' is {size} bytes, over the {MAX_TENSOR_BYTES}-byte limit",
                field,
            )
        _check_header(entry, path, shown, field)
    except FS_ERRORS as exc:
        raise entry.error(f"tensor file '{shown}': {fs_reason(exc)}", field) from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise entry.error(f"tensor file '{shown}' is not valid safetensors: {exc}", field) from None
    missing = [n for n in names if n not in tensors]
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise entry.error(
            f"tensor file '{shown}' must hold exactly {', '.join(names)}; "
            + (
                f"missing {', '.join(missing)}"
                if missing
                else f"unexpected {', '.join(shorten(e) for e in extra)}"
            ),
            field,
        )
    target = dtype or torch.float32
    readable = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        tensor = tensors[name]
        if not tensor.is_floating_point():
            raise entry.error(
                f"tensor '{name}' in '{shown}' has dtype {tensor.dtype}; a float is needed",
                field,
            )
        if tensor.dtype not in readable:
            dtype_name = dtypes.dtype_name(tensor.dtype)
            raise entry.error(f"tensor '{name}' in '{shown}' has dtype {dtype_name}; {_USE}", field)
        if not bool(torch.isfinite(tensor).all()):
            raise entry.error(f"tensor '{name}' in '{shown}' holds NaN or inf", field)
        converted = tensor.to(target)
        for cast in (target, *also_finite_in):
            values = converted if cast == target else tensor.to(cast)
            if not bool(torch.isfinite(values).all()):
                largest = float(tensor.abs().max())
                raise entry.error(
                    f"tensor '{name}' in '{shown}' holds values too large for "
                    f"{str(cast).removeprefix('torch.')} (largest magnitude {largest:.3g})",
                    field,
                )
        out[name] = converted
    return out


def _check_header(entry: MemoryEntry, path: Path, shown: str, field: str) -> None:
    """Refuse files that are not safetensors (a pickle, a .pt) before handing them on, and
    tensors whose dtype cannot be used, by name."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise entry.error(f"tensor file '{shown}' is not safetensors (too short)", field)
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > path.stat().st_size - 8:
            raise entry.error(
                f"tensor file '{shown}' is not safetensors (bad header length)", field
            )
        raw = handle.read(length)
    not_json = entry.error(f"tensor file '{shown}' is not safetensors (header is not JSON)", field)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise not_json from None
    problem = structure_problem(text, toml=False)
    if problem is not None:  # json recurses once per level
        raise entry.error(f"tensor file '{shown}' is not safetensors (header: {problem[0]})", field)
    try:
        header: Any = json.loads(text)
    except json.JSONDecodeError:
        raise not_json from None
    if not isinstance(header, dict):
        raise entry.error(f"tensor file '{shown}' is not safetensors (bad header)", field)
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue  # the safetensors reader judges the rest
        code = info.get("dtype")
        if not isinstance(code, str) or code in _READ_DTYPES or code in _INTEGER_DTYPES:
            continue
        dtype_name = _DTYPE_NAMES.get(code, repr(shorten(code, 40)))
        raise entry.error(
            f"tensor '{shorten(name)}' in '{shown}' has dtype {dtype_name}; {_USE}", field
        )
