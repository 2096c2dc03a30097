"""Project rules that keep untrusted input harmless (issue: reliability and security)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("torch", "load"),
    ("", "eval"),
    ("", "exec"),
    ("marshal", "loads"),
}


def python_sources() -> list[Path]:
    files = sorted((ROOT / "meminject").rglob("*.py"))
    files += sorted(p for p in (ROOT / "plugins").rglob("*.py") if "build" not in p.parts)
    return files


def forbidden(source: str, where: str) -> list[str]:
    """Imports of pickle and calls of pickle/torch.load/eval/exec in one source file."""
    offenders = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            module = getattr(node, "module", None) or ""
            if "pickle" in names or module == "pickle" or "dill" in names:
                offenders.append(f"{where}:{node.lineno}: imports pickle")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                pair = (func.value.id, func.attr)
            elif isinstance(func, ast.Name):
                pair = ("", func.id)
            else:
                continue
            if pair in FORBIDDEN_CALLS:
                offenders.append(f"{where}:{node.lineno}: calls {'.'.join(filter(None, pair))}")
    return offenders


def test_no_pickle_torch_load_or_eval_anywhere() -> None:
    sources = python_sources()
    assert sources, "the scan found no source files"
    offenders = [o for path in sources for o in forbidden(path.read_text("utf-8"), str(path))]
    assert offenders == []


def test_the_scan_catches_what_it_forbids() -> None:
    """The scanner itself must be able to fail."""
    bad = "import pickle\nimport torch\nx = torch.load('f')\neval('1')\n"
    assert forbidden(bad, "bad.py") == [
        "bad.py:1: imports pickle",
        "bad.py:3: calls torch.load",
        "bad.py:4: calls eval",
    ]


def test_killed_writer_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    target = tmp_path / "results.csv"
    target.write_bytes(b"old complete content\n")
    writer = textwrap.dedent(f"""
        import sys
        from meminject.atomic import write_bytes_atomic
        data = b"x" * (400 << 20)
        print("writing", flush=True)
        write_bytes_atomic({str(target)!r}, data, overwrite=True)
        print("done", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".results.csv.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.001)
    saw_temporary = bool(list(tmp_path.glob(".results.csv.*.tmp")))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    content = target.read_bytes()
    assert content in (b"old complete content\n", b"x" * (400 << 20))
    assert saw_temporary  # the kill really landed while the temporary file was open
    assert content == b"old complete content\n"
