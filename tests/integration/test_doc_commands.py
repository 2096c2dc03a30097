"""Every command shown in README.md and docs/ under a ``<!-- test: console -->`` marker
runs, verbatim, in a shell, and prints the output shown under it (tests/doc_blocks.py).
The shell finds ``meminject`` as this checkout's command line; the scratch directory
holds a copy of ``memories/``, as a fresh clone does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_blocks import (
    ROOT,
    blocks,
    command_pages,
    console_steps,
    output_matches,
)

pytestmark = pytest.mark.integration


def console_blocks(tier: str) -> list[tuple[str, str, str]]:
    """(page, block id, body) of the console blocks of ``tier`` ("" or "realmodel")."""
    found = []
    for page in command_pages():
        kinds = [(kind, name, body) for kind, name, body in blocks(page) if kind == "console"]
        for index, (_, name, body) in enumerate(kinds):
            if (name or "") == tier:
                found.append((page.relative_to(ROOT).as_posix(), f"#{index + 1}", body))
    return found


def page_files(page: str) -> dict[str, str]:
    """The ``<!-- test: file NAME -->`` blocks of a page: the console blocks may use them."""
    return {name: body for kind, name, body in blocks(ROOT / page) if kind == "file" and name}


def shell_env(tmp_path: Path) -> dict[str, str]:
    """PATH with a ``meminject`` that runs this checkout, threads kept to one."""
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "meminject"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m meminject.cli "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        COLUMNS="100",
        TERM="dumb",
    )
    env.pop("MEMINJECT_LOAD_PLUGINS", None)
    return env


def run_console_block(body: str, tmp_path: Path, files: dict[str, str] | None = None) -> None:
    shutil.copytree(ROOT / "memories", tmp_path / "memories")
    for name, text in (files or {}).items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n", encoding="utf-8")
    env = shell_env(tmp_path)
    for command, expected in console_steps(body):
        if " jq " in command and shutil.which("jq") is None:
            pytest.skip("jq is not installed")
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        actual = (done.stdout + done.stderr).splitlines()
        assert output_matches(expected, actual), (
            f"$ {command}\n--- shown ---\n"
            + "\n".join(expected)
            + "\n--- printed ---\n"
            + "\n".join(actual)
        )


@pytest.mark.parametrize(
    ("page", "block", "body"), console_blocks(""), ids=lambda x: x if "\n" not in x else ""
)
def test_shown_commands_print_what_is_shown(
    page: str, block: str, body: str, tmp_path: Path
) -> None:
    run_console_block(body, tmp_path, page_files(page))
