"""Runnable examples in the documentation: how they are marked and found (used by the
docs tests in tests/unit and tests/integration).

Runnable examples are marked in the markdown with HTML comments (invisible on the
site) right before a fenced block:

- ``<!-- test: file NAME -->`` — the block is written to NAME in a scratch directory;
- ``<!-- test: run -->`` — the block is run as a script there (after the files before
  it on the same page), with the directory on ``sys.path`` and as the working
  directory, and ``memories/`` linked in as in a checkout;
- ``<!-- test: pytest -->`` — the block is a test module, run by an in-process pytest
  (with meminject's fixtures, as a plugin author's suite would be); all must pass;
- ``<!-- test: console -->`` — a ``console`` block of ``$ command`` lines, each followed
  by the output it prints (standard output and error); the commands run in a shell in
  a scratch directory holding a copy of ``memories/``, and their output must match
  line for line (a line ``…`` stands for any lines). ``<!-- test: console realmodel -->``
  runs in the realmodel tier (tests/realmodel/test_realmodel_doc_commands.py).

Every fenced block in README.md and docs/ that shows a ``meminject`` command carries a
console marker or ``<!-- not run: REASON -->`` (a synopsis, an installation, a server,
hours of sweeping); tests/unit/test_docs.py holds them to it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

MARKER = re.compile(r"<!-- test: (\w+)(?: (\S+))? -->")
BLOCK = re.compile(
    r"<!-- test: (?P<kind>file|run|pytest|console)(?: (?P<name>\S+))? -->\n"
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


README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!-- not run: [^>]+ -->")
FENCE = re.compile(
    r"(?P<marker>(?:[ \t]*<!--[^\n]*-->\n)?)[ \t]*```(?P<lang>[\w-]*)\n(?P<body>.*?)\n[ \t]*```\n",
    re.S,
)
COMMAND = re.compile(r"^(?:\$ )?\s*meminject ", re.M)


def command_pages() -> list[Path]:
    """README.md and every docs page (architecture.md names commands in prose only)."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def shown_commands(page: Path) -> list[tuple[int, str, str]]:
    """(line, marker comment or "", body) of each fenced block showing a meminject command."""
    text = page.read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 1, m["marker"].strip(), m["body"])
        for m in FENCE.finditer(text)
        if COMMAND.search(m["body"])
    ]


def console_steps(body: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of a console block; a command's continuation
    lines end in a backslash."""
    steps: list[tuple[str, list[str]]] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith("$ "), f"a console block starts with '$ ': {line!r}"
        command = line[2:]
        while command.endswith("\\"):
            i += 1
            command += "\n" + lines[i]  # bash joins a backslash-newline
        i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        steps.append((command, output))
    return steps


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Line for line after trailing spaces; a line ``…`` matches any lines (none too)."""
    exp = [e.rstrip() for e in expected]
    act = [a.rstrip() for a in actual]

    def match(i: int, j: int) -> bool:
        if i == len(exp):
            return j == len(act)
        if exp[i] == "…":
            return any(match(i + 1, k) for k in range(j, len(act) + 1))
        return j < len(act) and exp[i] == act[j] and match(i + 1, j + 1)

    return match(0, 0)
