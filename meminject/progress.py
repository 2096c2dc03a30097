"""What meminject says on standard error while it works: first-use notes and progress.

The command line turns it on (every command but ``--quiet`` ones); the Python API is
silent unless a caller calls :func:`enable`. Two kinds of output:

- :func:`note`: one line (``meminject: …``) for what happens once and is worth a log
  entry: converting and caching a model's weights on first use, where the cache is
  and how big it got. Printed whether or not standard error is a terminal.
- :func:`step` and :func:`bar`: live progress (rich) for steps that can take more than
  a moment: a spinner with the time elapsed, or a bar with a known total. Shown only on
  a terminal, and transient: a finished step leaves no line behind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

_state = {"enabled": False}


def enable(on: bool = True) -> None:
    """Turn notes and progress on (the command line does, unless ``--quiet``) or off."""
    _state["enabled"] = on


def enabled() -> bool:
    return _state["enabled"]


def live() -> bool:
    """Whether live progress is drawn: enabled, and standard error is a terminal."""
    return enabled() and sys.stderr.isatty()


def note(message: str) -> None:
    """One line on standard error, when enabled."""
    if enabled():
        print(f"meminject: {message}", file=sys.stderr, flush=True)


def _progress(*columns: Any, transient: bool = True) -> Any:
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, console=Console(stderr=True), transient=transient, disable=not live())


@contextmanager
def step(description: str) -> Iterator[None]:
    """A spinner with ``description`` and the time elapsed while the block runs."""
    if not live():
        yield
        return
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    with _progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as p:
        p.add_task(description, total=None)
        yield


@contextmanager
def bar(description: str, total: float, unit: str = "") -> Iterator[Any]:
    """A bar of ``total`` (bytes with ``unit="bytes"``); the block calls the yielded
    function with each amount done."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    amount = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    with _progress(
        TextColumn("{task.description}"), BarColumn(), amount, TimeRemainingColumn()
    ) as p:
        task = p.add_task(description, total=total)
        yield lambda done: p.advance(task, done)


def size_of(path: Path) -> int:
    """Bytes in the files under ``path`` (or of the file), links not followed."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += (Path(root) / name).lstat().st_size
    return total


def human_size(n: float) -> str:
    """``1.2 GB``, ``350 MB``: decimal units, as ``du -h --si`` and file managers."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "kB") or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
