"""Atomic file writes: a temporary file in the target's directory, fsync, then rename.

A reader (or a process killed mid-write) sees either the old file or the whole
new one, never a prefix. Shared by every command that writes results.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from meminject.errors import BadInputError


def write_bytes_atomic(path: Path | str, data: bytes, *, overwrite: bool = False) -> None:
    path = Path(path)
    if path.exists() and not overwrite:
        raise BadInputError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        # (or keep the replaced file's), so results stay readable as users expect.
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path | str, text: str, *, overwrite: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite)


def publish_dir(work: Path, target: Path, is_whole: Callable[[Path], bool]) -> Path:
    """Rename the finished directory ``work`` into place as ``target``, so a reader sees
    a whole directory or none. When another process got there first with a whole one,
    ``work`` is dropped and theirs kept; a half-made ``target`` is replaced."""
    if target.exists():
        if is_whole(target):
            shutil.rmtree(work, ignore_errors=True)
            return target
        shutil.rmtree(target)
    os.rename(work, target)
    return target
