"""Reading a file a user named: a regular file only, never more than a limit.

Memory files, prompt files and dataset CSVs all come from the command line, so each
may be a FIFO (reading it hangs), a device, a directory, a symlink loop, a name the
file system refuses, or far larger than anything sensible. One reader handles all of
that, so the three callers differ only in how they word the refusal.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

#: What a file-system call raises for a bad name: OSError (a loop, a name too long,
#: permission denied), ValueError (a NUL byte), RuntimeError (pathlib's "Symlink loop").
FS_ERRORS = (OSError, ValueError, RuntimeError)


def fs_reason(exc: BaseException) -> str:
    """Why a file-system call failed, in a few words; re-raises what is not about a name."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, OSError):
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.ENAMETOOLONG:
            return "name is too long for the file system"
        return exc.strerror or type(exc).__name__
    if isinstance(exc, ValueError):
        if "null" in str(exc):
            return "name contains a NUL byte"
        return "name cannot be used on this file system"
    if isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop"):
        return "symbolic link loop"
    raise exc


def describe_mode(mode: int) -> str:
    """What a non-regular file is, for an error message."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file"


class ReadRefused(Exception):
    """Why a file was not read. ``kind`` is ``missing``, ``unreadable`` (``reason`` says
    why), ``not-regular`` (``reason`` says what it is) or ``too-large`` (``size`` is the
    size stat reported, or None when the file grew past the limit while being read)."""

    def __init__(self, kind: str, reason: str, size: int | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.size = size


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    The file is opened without blocking and its type checked again on the open file
    descriptor, so a FIFO swapped in after the first check cannot hang the read."""
    try:
        info = path.stat()
    except FS_ERRORS as exc:
        kind = "missing" if isinstance(exc, FileNotFoundError) else "unreadable"
        raise ReadRefused(kind, fs_reason(exc)) from None
    if not stat.S_ISREG(info.st_mode):
        raise ReadRefused("not-regular", describe_mode(info.st_mode))
    if info.st_size > limit:
        raise ReadRefused("too-large", "too large", info.st_size)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FS_ERRORS as exc:
        raise ReadRefused("unreadable", fs_reason(exc)) from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise ReadRefused("not-regular", describe_mode(opened.st_mode))
        if opened.st_size > limit:
            raise ReadRefused("too-large", "too large", opened.st_size)
        with os.fdopen(os.dup(fd), "rb") as handle:  # no more than the limit, whatever stat said
            raw = handle.read(limit + 1)
    except OSError as exc:
        raise ReadRefused("unreadable", fs_reason(exc)) from None
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise ReadRefused("too-large", "too large")
    return raw


def read_user_text(path: Path, limit: int, what: str) -> str:
    """:func:`read_user_file` decoded as UTF-8 (a BOM is dropped), or a one-line
    :class:`BadInputError` saying where the bytes stop being UTF-8."""
    from meminject.errors import BadInputError

    raw = read_user_file(path, limit, what)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_user_file(path: Path, limit: int, what: str) -> bytes:
    """:func:`read_regular`, with every refusal a one-line :class:`BadInputError` naming
    the file (``what`` names the kind of file in the size limit's message)."""
    from meminject.errors import BadInputError

    try:
        return read_regular(path, limit)
    except ReadRefused as refused:
        if refused.kind == "missing":
            raise BadInputError(f"{path}: no such file") from None
        if refused.kind == "unreadable":
            raise BadInputError(f"{path}: cannot read: {refused.reason}") from None
        if refused.kind == "not-regular":
            raise BadInputError(f"{path}: not a regular file ({refused.reason})") from None
        size = f"file is {refused.size} bytes, over" if refused.size is not None else "file is over"
        raise BadInputError(f"{path}: {size} the {limit}-byte limit for {what}") from None
