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
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file in ``path``'s directory (open descriptor, name) to be renamed
    onto ``path``, with the mode every file meminject writes gets: the replaced file's,
    else what a plain ``open()`` gives (0666 less the umask). ``mkstemp`` alone would make
    it private (0600), so files written this way would differ from the others."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


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
