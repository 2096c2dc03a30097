"""The documentation site without a model: its references are generated and complete,
every plugin hook is documented with an example and tested, and the marked examples are
well formed (tests/doc_blocks.py). The examples run in
tests/integration/test_doc_examples.py."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import tomllib

from meminject import hookspecs
from tests.doc_blocks import DOCS, ROOT, blocks, blocks_in, pages_with_examples

HOOKS_PAGE = DOCS / "plugins" / "hooks.md"
TUTORIAL = DOCS / "plugins" / "tutorial.md"

HOOKS = sorted(
    name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "meminject_spec")
)


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


def test_pages_with_examples_include_the_plugin_guide() -> None:
    pages = {p.relative_to(DOCS).as_posix() for p in pages_with_examples()}
    assert {"plugins/tutorial.md", "plugins/hooks.md", "python-api.md"} <= pages


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
    from meminject.cli.options import current_names

    page = docs_hook_module().cli_reference()
    for name, command in cli.commands.items():
        assert f"## meminject {name}\n" in page
        for param in command.params:
            if isinstance(param, click.Option):
                assert max(current_names(param), key=len) in page, (name, param.opts)
                hidden = set(param.opts) - set(current_names(param))
                for old in hidden:  # old spellings parse but are not shown
                    assert not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", page), old
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


def test_the_shipped_memories_validate_and_their_names_are_unique() -> None:
    """Every model's folder validates as one set, and no two shipped memories share a
    name, so any of them can be combined with -m (issue 29: best-cell-2wiki twice)."""
    from click.testing import CliRunner

    from meminject.cli import cli
    from meminject.memfile import expand_paths, read_memory_file
    from meminject.plugins import get_registry

    for folder in sorted(p for p in (ROOT / "memories").iterdir() if p.is_dir()):
        result = CliRunner().invoke(cli, ["validate", str(folder)])
        assert result.exit_code == 0, result.output
    names = [
        entry.name
        for path in expand_paths([ROOT / "memories"])
        for entry in read_memory_file(path, get_registry()).entries
    ]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_every_shown_command_is_run_or_says_why_not() -> None:
    """A fenced block that shows a meminject command carries ``<!-- test: console -->``
    (it runs, with its output, in tests/integration/test_doc_commands.py) or
    ``<!-- not run: REASON -->``."""
    from tests.doc_blocks import NOT_RUN, command_pages, shown_commands

    unmarked = [
        f"{page.relative_to(ROOT)}:{line}"
        for page in command_pages()
        if page.name != "architecture.md"
        for line, marker, _ in shown_commands(page)
        if not (marker.startswith("<!-- test: console") or NOT_RUN.fullmatch(marker))
    ]
    assert not unmarked, unmarked


def test_console_blocks_parse() -> None:
    from tests.doc_blocks import blocks, command_pages, console_steps, output_matches

    for page in command_pages():
        for kind, _, body in blocks(page):
            if kind == "console":
                assert console_steps(body), page
    assert output_matches(["a", "…", "d"], ["a", "b", "c", "d"])
    assert output_matches(["a", "…"], ["a"])
    assert not output_matches(["a", "d"], ["a", "b", "d"])
