"""The commands README.md and docs/ show on the real models, under
``<!-- test: console realmodel -->``, run verbatim and print what is shown
(tests/integration/test_doc_commands.py runs the toyworld ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meminject import model_sources
from tests.integration.test_doc_commands import console_blocks, page_files, run_console_block
from tests.realmodel.conftest import require

pytestmark = pytest.mark.realmodel


@pytest.mark.parametrize(
    ("page", "block", "body"),
    console_blocks("realmodel"),
    ids=lambda x: x if "\n" not in x else "",
)
def test_shown_real_model_commands_print_what_is_shown(
    page: str, block: str, body: str, tmp_path: Path
) -> None:
    require(model_sources.SMOLLM2)
    if "gemma3-270m" in body:
        require(model_sources.GEMMA3)
    run_console_block(body, tmp_path, page_files(page))
