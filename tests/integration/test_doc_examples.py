"""The documentation's runnable examples (tests/doc_blocks.py) run as a reader would run
them, on the shipped model; and the README's Python block.

``toyworld`` is loaded once for all examples, so the whole file stays well under a
minute; the examples themselves call ``meminject.load_model("toyworld")`` as a reader
would.
"""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.doc_blocks import DOCS, ROOT, blocks, pages_with_examples


@pytest.fixture(scope="module")
def toyworld() -> Any:
    from meminject.loading import load_model

    return load_model("toyworld")


@pytest.mark.parametrize(
    "page", pages_with_examples(), ids=lambda p: p.relative_to(DOCS).as_posix()
)
def test_doc_examples_run(
    page: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, toyworld: Any
) -> None:
    import meminject.loading

    real_load = meminject.loading.load_model

    def load_model(name_or_path: Any = "toyworld", **kwargs: Any) -> Any:
        if str(name_or_path) == "toyworld" and not any(kwargs.values()):
            return toyworld  # loaded once for the module; the examples ask for it often
        return real_load(name_or_path, **kwargs)

    monkeypatch.setattr(meminject.loading, "load_model", load_model)
    monkeypatch.delenv("MEMINJECT_LOAD_PLUGINS", raising=False)
    (tmp_path / "memories").symlink_to(ROOT / "memories", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    modules_before = set(sys.modules)
    written: dict[str, str] = {}
    try:
        for index, (kind, name, body) in enumerate(blocks(page)):
            if kind == "file":
                assert name, f"{page}: block {index} needs a file name"
                target = tmp_path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(body + "\n", encoding="utf-8")
                written[name] = body
            elif kind == "console":
                continue  # tests/integration/test_doc_commands.py runs them
            elif kind == "run":
                script = tmp_path / f"_example_{index}.py"
                script.write_text(body + "\n", encoding="utf-8")
                try:
                    runpy.run_path(str(script), run_name=f"_docs_example_{index}")
                except Exception as exc:
                    where = f"{page.relative_to(ROOT)}, marked block #{index + 1}"
                    raise AssertionError(f"the example in {where} failed: {exc!r}") from exc
            else:
                test_file = f"test_docs_example_{index}.py"
                (tmp_path / test_file).write_text(body + "\n", encoding="utf-8")
                # A pytest block runs in its own process, as a reader runs it. (In this
                # process, pytest's pytester would drop from sys.modules whatever the
                # example imported first, TransformerLens's lazily imported modules
                # among them; their second copies break later tests' bridges.)
                result = subprocess.run(
                    [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"],
                    cwd=tmp_path,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                passed = re.search(r"(\d+) passed", result.stdout)
                assert result.returncode == 0 and passed, result.stdout + result.stderr
    finally:
        toyworld.encodings.clear()
        for name in set(sys.modules) - modules_before:
            if name.startswith(("meminject_", "test_docs_example_", "_docs_example_")):
                del sys.modules[name]


@pytest.mark.integration
def test_readme_python_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block, run as written from the repository root."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"## Python\n\n```python\n(.*?)\n```", readme, re.DOTALL)
    monkeypatch.chdir(ROOT)
    output: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: output.append(" ".join(map(str, a))))
    exec(compile(code, "README.md", "exec"), {"__name__": "_readme_example"})
    assert output == [" Kachakea. →  Soveisica.", " Soveisica"]
