"""Runnable examples in the documentation: how they are marked and found (used by the
docs tests in tests/unit and tests/integration).

Runnable examples are marked in the markdown with HTML comments (invisible on the
site) right before a fenced block:

- ``<!-- test: file NAME -->`` — the block is written to NAME in a scratch directory;
- ``<!-- test: run -->`` — the block is run as a script there (after the files before
  it on the same page), with the directory on ``sys.path`` and as the working
  directory, and ``memories/`` linked in as in a checkout;
- ``<!-- test: pytest -->`` — the block is a test module, run by an in-process pytest
  (with meminject's fixtures, as a plugin author's suite would be); all must pass.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

MARKER = re.compile(r"<!-- test: (\w+)(?: (\S+))? -->")
BLOCK = re.compile(
    r"<!-- test: (?P<kind>file|run|pytest)(?: (?P<name>\S+))? -->\n"
    r"```[\w-]*\n(?P<body>.*?)\n```\n",
    re.DOTALL,
)


def blocks_in(text: str) -> list[tuple[str, str | None, str]]:
    """(kind, file name or None, code) of each marked block, in order."""
    return [(m["kind"], m["name"], m["body"]) for m in BLOCK.finditer(text)]


def blocks(page: Path) -> list[tuple[str, str | None, str]]:
    text = page.read_text(encoding="utf-8")
    found = blocks_in(text)
    assert len(found) == len(MARKER.findall(text)), (
        f"{page}: a test marker is not followed by a block"
    )
    return found


def pages_with_examples() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if MARKER.search(p.read_text(encoding="utf-8")))
