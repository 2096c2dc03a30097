"""meminject.progress: what the command line says on standard error (issue 29)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meminject import progress


@pytest.fixture(autouse=True)
def _restore() -> object:
    before = progress.enabled()
    yield
    progress.enable(before)


def test_notes_only_when_enabled(capsys: pytest.CaptureFixture) -> None:
    progress.enable(False)
    progress.note("hidden")
    progress.enable(True)
    progress.note("shown")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "meminject: shown\n"


def test_live_progress_needs_a_terminal(capsys: pytest.CaptureFixture) -> None:
    """Under pytest standard error is not a terminal: steps and bars draw nothing."""
    progress.enable(True)
    assert not progress.live()
    with progress.step("working"):
        pass
    with progress.bar("reading", 10, unit="bytes") as advance:
        advance(10)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (1500, "2 kB"), (2_500_000, "2.5 MB"), (538e6, "538 MB")],
)
def test_human_size(n: float, text: str) -> None:
    assert progress.human_size(n) == text


def test_size_of_counts_files_below(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"x" * 5)
    assert progress.size_of(tmp_path) == 15
    assert progress.size_of(tmp_path / "a") == 10


def test_the_cli_enables_progress_and_quiet_disables_it() -> None:
    from click.testing import CliRunner

    from meminject.cli import cli

    progress.enable(False)
    CliRunner().invoke(cli, ["schema", "--generation"])
    assert progress.enabled()
    CliRunner().invoke(cli, ["validate", "--quiet", "no-such-file.toml"])
    assert not progress.enabled()


@pytest.mark.parametrize(
    ("rgba", "colour"),
    [((0.02, 0.19, 0.38, 1.0), "white"), ((0.97, 0.97, 0.97, 1.0), "black"),
     ((0.4, 0.0, 0.12, 1.0), "white"), ((0.99, 0.86, 0.78, 1.0), "black")],
)  # fmt: skip
def test_heatmap_numbers_read_on_their_cells(rgba: tuple[float, ...], colour: str) -> None:
    """Issue 29: black numbers on navy cells. RdBu_r's ends are dark: white text there."""
    from meminject.plots import text_colour

    assert text_colour(rgba) == colour
