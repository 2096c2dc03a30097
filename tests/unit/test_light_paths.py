"""Light commands must not import torch, transformer_lens or Ray (each costs seconds)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import write

#: Ray (the optional sweep executor) is as heavy, and must stay out of light paths too.
HEAVY = ("torch", "transformer_lens", "transformers", "ray")


def run_cli_and_list_heavy_modules(args: list[str]) -> tuple[int, list[str], str]:
    code = textwrap.dedent(f"""
        import sys
        from meminject.cli import main
        try:
            main({args!r})
        except SystemExit as exc:
            code = exc.code or 0
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
        print('HEAVY=' + ','.join(heavy), file=sys.stderr)
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    heavy_line = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")][-1]
    heavy = [m for m in heavy_line[len("HEAVY=") :].split(",") if m]
    return proc.returncode, heavy, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["plugins"],
        ["encoders"],
        ["strategies"],
        ["datasets"],
        ["backends"],
        ["models"],
        ["schema"],
        ["generate", "--help"],
        ["sweep", "--help"],
    ],
)
def test_light_commands_import_no_torch(args: list[str]) -> None:
    code, heavy, output = run_cli_and_list_heavy_modules(args)
    assert code == 0, output
    assert heavy == []


def test_validate_without_model_imports_no_torch(tmp_path: Path) -> None:
    path = write(
        tmp_path / "m.toml",
        'version = 1\n[[memory]]\nname = "m"\ntext = "Paris"\nlayer = 1\ntau = 2.0\n',
    )
    code, heavy, output = run_cli_and_list_heavy_modules(["validate", str(path)])
    assert code == 0, output
    assert "ok: 1 memory in 1 file (schema)" in output
    assert heavy == []


def test_validate_error_imports_no_torch_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path / "m.toml", "version = 1\n")
    code, heavy, _ = run_cli_and_list_heavy_modules(["validate", str(path)])
    assert code == 2
    assert heavy == []
