"""The documentation's runnable examples (tests/doc_blocks.py) run as a reader would run
them, on the shipped model; and the README's Python block.

``toyworld`` is loaded once for all examples, so the whole file stays well under a
minute; the examples themselves call ``meminject.load_model("toyworld")`` as a reader
would.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.doc_blocks import DOCS, ROOT, blocks, pages_with_examples

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def toyworld() -> Any:
    from meminject.loading import load_model

    return load_model("toyworld")


@pytest.fixture(scope="module", autouse=True)
def _import_rich_fully() -> None:
    """Import (and render with) every part of rich the commands use, before any test.

    The ``pytester`` fixture removes from ``sys.modules``, when its test ends, whatever
    was first imported during the test. If an example is the first to render a rich
    table, half of rich is dropped and re-imported later as a second copy whose
    ``Style`` class is not the first one's; every later table in this process then
    fails. A module-scoped fixture runs before ``pytester`` takes its snapshot."""
    import io

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(file=io.StringIO(), width=80, force_terminal=True)
    table = Table(title="t", header_style="bold")
    table.add_column("a", style="bold", overflow="fold")
    table.add_row("[dim]x[/][bold]y[/]")
    console.print(table)
    console.print("[bold]markup[/]: text")
    with Progress(console=console, transient=True) as progress:
        progress.add_task("task", total=1)


@pytest.mark.parametrize(
    "page", pages_with_examples(), ids=lambda p: p.relative_to(DOCS).as_posix()
)
def test_doc_examples_run(
    page: Path, monkeypatch: pytest.MonkeyPatch, pytester: pytest.Pytester, toyworld: Any
) -> None:
    import meminject.loading

    tmp_path = pytester.path  # the scratch directory, also where pytest blocks run

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
                result = pytester.runpytest_inprocess(test_file, "-q", "-p", "no:cacheprovider")
                outcomes = result.parseoutcomes()
                assert result.ret == 0 and outcomes.get("passed", 0) > 0, result.stdout.str()
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
