"""The commands docs/export.md shows under ``<!-- test: console llamacpp -->`` (meminject
export, then llama.cpp's ``llama-completion`` with and without the control vector) run
verbatim, with the built binary on ``PATH``, and print what is shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.test_doc_commands import console_blocks, page_files, run_console_block
from tests.llamacpp_tier.conftest import require_binary, require_smollm2

pytestmark = pytest.mark.llamacpp


def test_the_export_page_shows_llama_cpp_commands() -> None:
    assert any(page == "docs/export.md" for page, _, _ in console_blocks("llamacpp"))


@pytest.mark.parametrize(
    ("page", "block", "body"),
    console_blocks("llamacpp"),
    ids=lambda x: x if "\n" not in x else "",
)
def test_shown_llama_cpp_commands_print_what_is_shown(
    page: str, block: str, body: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = require_binary()
    require_smollm2()
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    run_console_block(body, tmp_path, page_files(page))
