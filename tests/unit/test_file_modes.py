"""Every file meminject writes gets one mode: what a plain ``open()`` gives (0666 less
the umask), or the mode of the file it replaces (issue 29: export wrote 0600, learn
0644)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from meminject import atomic, model_sources
from meminject.cli import cli
from meminject.export_llama_cpp import write_control_vector


@pytest.fixture
def umask() -> int:
    mask = os.umask(0o022)
    yield 0o022
    os.umask(mask)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_every_writer_gives_the_same_mode(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    atomic.write_text_atomic(tmp_path / "text.txt", "x")
    write_control_vector(tmp_path / "cv.gguf", {1: np.ones(4, dtype=np.float32)}, hint="gpt2")
    piece = tmp_path / "piece"
    piece.write_bytes(b"abc")
    model_sources._assemble([piece], tmp_path / "assembled.gguf", None)
    result = CliRunner().invoke(cli, ["schema", "-o", str(tmp_path / "schema.json")])
    assert result.exit_code == 0, result.output
    written = ["text.txt", "cv.gguf", "assembled.gguf", "schema.json"]
    assert {name: mode(tmp_path / name) for name in written} == dict.fromkeys(written, expected)


def test_a_replaced_file_keeps_its_mode(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "cv.gguf"
    write_control_vector(path, {1: np.ones(4, dtype=np.float32)}, hint="gpt2")
    path.chmod(0o640)
    write_control_vector(path, {1: np.zeros(4, dtype=np.float32)}, hint="gpt2", overwrite=True)
    assert mode(path) == 0o640
