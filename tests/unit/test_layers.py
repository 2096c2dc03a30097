"""The core's layers (docs/architecture.md, "Layers"): import-linter's contracts hold,
they can fail, and the facts they protect stay in their one owner."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "meminject"


def lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """import-linter on the ``meminject`` package found under ``root``."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--config",
            str(config),
            "--no-cache",
        ],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_contracts_hold() -> None:
    done = lint_imports(ROOT, ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # An upward import, even a function-local one, breaks the layers.
        ("memfile.py", "def _up():\n    from meminject.plugins import get_registry\n", "layers"),
        # So does one only under TYPE_CHECKING.
        (
            "sites.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from meminject.model_handle import LoadedModel\n",
            "layers",
        ),
    ],
)
def test_an_upward_import_breaks_them(tmp_path: Path, module: str, line: str, broken: str) -> None:
    shutil.copytree(PACKAGE, tmp_path / "meminject", ignore=shutil.ignore_patterns("weights"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "meminject" / module).open("a", encoding="utf-8") as f:
        f.write("\n" + line)
    done = lint_imports(tmp_path, tmp_path / "pyproject.toml")
    assert done.returncode != 0
    assert f"meminject's {broken} BROKEN" in done.stdout


def test_a_module_the_contract_does_not_name_breaks_them(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "meminject", ignore=shutil.ignore_patterns("weights"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "meminject" / "newcomer.py").write_text("X = 1\n", encoding="utf-8")
    done = lint_imports(tmp_path, tmp_path / "pyproject.toml")
    assert done.returncode != 0
    assert "meminject.newcomer" in done.stdout


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_only_the_sites_table_spells_hook_points() -> None:
    spelled = re.compile(r"""f["']blocks\.""")
    offenders = [
        str(path.relative_to(ROOT))
        for path in _sources()
        if path.name != "sites.py" and spelled.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_no_registry_is_typed_any() -> None:
    untyped = re.compile(r"registry: Any\b")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _sources()
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if untyped.search(text)
    ]
    assert offenders == []
