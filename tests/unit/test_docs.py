"""The documentation site: its examples run, its references are generated and complete,
and every plugin hook is documented with an example and tested.

Runnable examples are marked in the markdown with HTML comments (invisible on the
site) right before a fenced block:

- ``<!-- test: file NAME -->`` — the block is written to NAME in a scratch directory;
- ``<!-- test: run -->`` — the block is run as a script there (after the files before
  it on the same page), with the directory on ``sys.path`` and as the working
  directory, and ``memories/`` linked in as in a checkout;
- ``<!-- test: pytest -->`` — the block is a test module, run by an in-process pytest
  (with meminject's fixtures, as a plugin author's suite would be); all must pass.

``toyworld`` is loaded once for all examples, so the whole file stays well under a
minute; the examples themselves call ``meminject.load_model("toyworld")`` as a reader
would.
"""

from __future__ import annotations

import importlib.util
import re
import runpy
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tomllib

from meminject import hookspecs

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
HOOKS_PAGE = DOCS / "plugins" / "hooks.md"
TUTORIAL = DOCS / "plugins" / "tutorial.md"

MARKER = re.compile(r"<!-- test: (\w+)(?: (\S+))? -->")
BLOCK = re.compile(
    r"<!-- test: (?P<kind>file|run|pytest)(?: (?P<name>\S+))? -->\n"
    r"```[\w-]*\n(?P<body>.*?)\n```\n",
    re.DOTALL,
)
HOOKS = sorted(
    name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "meminject_spec")
)


def blocks_in(text: str) -> list[tuple[str, str | None, str]]:
    """(kind, file name or None, code) of each marked block, in order."""
    return [(m["kind"], m["name"], m["body"]) for m in BLOCK.finditer(text)]


def blocks(page: Path) -> list[tuple[str, str | None, str]]:
    text = page.read_text(encoding="utf-8")
    found = blocks_in(text)
    assert len(found) == len(MARKER.findall(text)), (
        f"{page}: a test marker is not followed by a block"
    )
    return found


def pages_with_examples() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if MARKER.search(p.read_text(encoding="utf-8")))


def docs_hook_module() -> ModuleType:
    """docs/hooks/meminject_docs.py, the MkDocs hook that generates the references."""
    path = DOCS / "hooks" / "meminject_docs.py"
    spec = importlib.util.spec_from_file_location("meminject_docs_hook", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(text: str, heading: str) -> str:
    """The body of a ``## heading`` section, up to the next ``## ``."""
    match = re.search(
        rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL
    )
    assert match, f"no section '## {heading}'"
    return match.group(1)


# --- hooks: documented and tested -------------------------------------------------------


def test_hookspecs_are_found() -> None:
    assert HOOKS == [
        "register_backends",
        "register_commands",
        "register_datasets",
        "register_encoders",
        "register_models",
        "register_strategies",
    ]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_a_runnable_example(hook: str) -> None:
    body = section(HOOKS_PAGE.read_text(encoding="utf-8"), hook)
    assert f"def {hook}(" in body.split("<!-- test:")[0], "the signature comes first"
    files = [b for kind, _, b in blocks_in(body) if kind == "file"]
    runs = [b for kind, _, b in blocks_in(body) if kind == "run"]
    assert any(re.search(rf"@hookimpl\s*\ndef {hook}\(", f) for f in files), (
        f"the {hook} section needs a plugin module implementing it"
    )
    assert runs, f"the {hook} section needs a script using the plugin"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_implementing_it(hook: str) -> None:
    """Some test in tests/ registers a plugin implementing the hook (which makes the
    registry call it). This file's own examples do not count."""
    pattern = re.compile(rf"@hookimpl\s*\n\s*def {hook}\(")
    users = [
        path.relative_to(ROOT)
        for path in (ROOT / "tests").rglob("test_*.py")
        if path.name != Path(__file__).name and pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert users, f"no test implements {hook}"


# --- runnable examples ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def toyworld() -> Any:
    from meminject.loading import load_model

    return load_model("toyworld")


def test_pages_with_examples_include_the_plugin_guide() -> None:
    pages = {p.relative_to(DOCS).as_posix() for p in pages_with_examples()}
    assert {"plugins/tutorial.md", "plugins/hooks.md", "python-api.md"} <= pages


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


def test_tutorial_pyproject_declares_the_plugin_it_builds() -> None:
    """The packaging step can't be pip-installed in a test; check what it would do."""
    files = {name: body for kind, name, body in blocks(TUTORIAL) if kind == "file"}
    project = tomllib.loads(files["pyproject.toml"])["project"]
    (entry,) = project["entry-points"]["meminject"].values()
    assert f"{entry}.py" in files
    assert project["name"] == "meminject-pooled"


def test_readme_quick_start_commands_are_in_getting_started() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = section(readme, "Quick start")
    commands = re.findall(r"```bash\n(.*?)\n```", quick, re.DOTALL)
    assert len(commands) == 2
    getting_started = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    for command in commands:
        assert f"```bash\n{command}\n```" in getting_started


# --- generated references ----------------------------------------------------------------


def test_memory_file_reference_covers_every_field() -> None:
    from meminject.plugins import build_registry
    from meminject.schema import SITE_HOOKS, json_schema

    page = docs_hook_module().memory_file_reference()
    registry = build_registry(load_entrypoints=False)
    schema = json_schema(registry.file_model)
    for definition in [schema, *schema["$defs"].values()]:
        for field in definition["properties"]:
            assert f"| `{field}` |" in page, field
    for name in [*registry.encoders, *registry.strategies, *SITE_HOOKS]:
        assert f"`{name}`" in page
    assert "memories/memory.schema.json" in page


def test_downloadable_schema_is_the_committed_one() -> None:
    committed = (ROOT / "memories" / "memory.schema.json").read_text(encoding="utf-8")
    assert docs_hook_module().schema_json() == committed


def test_cli_reference_covers_every_command_and_option() -> None:
    import click

    from meminject.cli import cli

    page = docs_hook_module().cli_reference()
    for name, command in cli.commands.items():
        assert f"## meminject {name}\n" in page
        for param in command.params:
            if isinstance(param, click.Option):
                assert max(param.opts, key=len) in page, (name, param.opts)
    for param in cli.params:
        assert param.opts[0] in page


def test_api_and_fields_markers_render() -> None:
    hook = docs_hook_module()
    for page in DOCS.rglob("*.md"):
        text = page.read_text(encoding="utf-8")
        if "<!-- api: " in text or "<!-- fields: " in text:
            rendered = hook.expand_markers(text)
            assert "<!-- api: " not in rendered and "<!-- fields: " not in rendered
    api = hook.expand_markers((DOCS / "python-api.md").read_text(encoding="utf-8"))
    for name in (
        "load_model",
        "load_memories",
        "inject",
        "generate",
        "compile_memories",
        "learn",
    ):
        assert f"```python\n{name}(" in api, name


def test_testing_page_lists_every_fixture() -> None:
    source = (ROOT / "meminject" / "pytest_plugin.py").read_text(encoding="utf-8")
    fixtures = re.findall(r"@pytest\.fixture[^\n]*\ndef (\w+)\(", source)
    assert len(fixtures) >= 5
    page = (DOCS / "plugins" / "testing.md").read_text(encoding="utf-8")
    for name in fixtures:
        assert f"`{name}`" in page, name


def test_nav_names_only_existing_pages() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    generated = set(docs_hook_module().GENERATED_PAGES)
    for target in re.findall(r":\s+(\S+\.md)\s*$", config, re.MULTILINE):
        assert (DOCS / target).is_file() or target in generated, target


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
