"""The example plugin packages under plugins/: their packaging, and their discovery
through entry points and ``MEMINJECT_LOAD_PLUGINS`` once pip-installed.

The packaging checks always run. The discovery checks need the packages installed
(``pip install -e plugins/meminject-contrast -e plugins/meminject-relative``, as CI
does) and skip with that reason otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

from meminject.plugins import ENTRY_POINT_GROUP, ENV_VAR, build_registry

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"

# distribution → (entry-point name, module, what it registers)
EXAMPLES = {
    "meminject-contrast": ("contrast", "meminject_contrast", ("encoders", "contrast")),
    "meminject-relative": ("relative", "meminject_relative", ("strategies", "relative")),
}


def installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def needs(*dists: str):
    missing = [d for d in dists if not installed(d)]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"{', '.join(missing)} not installed (pip install -e plugins/<name>)",
    )


def pyproject(dist: str) -> dict:
    return tomllib.loads((PLUGINS / dist / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_plugin_directory_is_an_example_we_know() -> None:
    found = sorted(p.name for p in PLUGINS.iterdir() if (p / "pyproject.toml").is_file())
    assert found == sorted(EXAMPLES)


@pytest.mark.parametrize("dist", sorted(EXAMPLES))
def test_example_is_a_complete_package(dist: str) -> None:
    """What a third-party author copies: metadata, entry point, README and tests."""
    ep_name, module, _ = EXAMPLES[dist]
    project = pyproject(dist)["project"]
    assert project["name"] == dist
    assert project["entry-points"][ENTRY_POINT_GROUP] == {ep_name: module}
    assert any(dep.startswith("meminject>=") for dep in project["dependencies"])
    assert (PLUGINS / dist / module / "__init__.py").is_file()
    assert (PLUGINS / dist / "README.md").read_text(encoding="utf-8").startswith(f"# {dist}")
    assert list((PLUGINS / dist / "tests").glob("test_*.py"))


@pytest.mark.parametrize("dist", sorted(EXAMPLES))
def test_examples_import_without_torch(dist: str) -> None:
    """Installed plugins load on every ``meminject`` call, light ones included."""
    module = EXAMPLES[dist][1]
    code = (
        f"import sys; sys.path.insert(0, {str(PLUGINS / dist)!r}); import {module}; "
        "print(sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


@needs(*EXAMPLES)
@pytest.mark.parametrize("dist", sorted(EXAMPLES))
def test_installed_entry_point_points_at_the_module(dist: str) -> None:
    ep_name, module, _ = EXAMPLES[dist]
    eps = {ep.name: ep for ep in metadata.distribution(dist).entry_points}
    assert eps[ep_name].group == ENTRY_POINT_GROUP and eps[ep_name].value == module


@needs(*EXAMPLES)
def test_installed_examples_are_discovered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    registry = build_registry()
    infos = {p.name: p for p in registry.plugins}
    for dist, (ep_name, _, (kind, name)) in EXAMPLES.items():
        assert infos[ep_name].version == pyproject(dist)["project"]["version"]
        assert not infos[ep_name].builtin
        assert getattr(registry, kind)[name].plugin == ep_name


@needs(*EXAMPLES)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", set()),
        ("contrast", {"contrast"}),
        ("meminject-relative", {"relative"}),  # a distribution name works too
        ("contrast, relative", {"contrast", "relative"}),
    ],
)
def test_load_plugins_env_var_filters_the_examples(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: set[str]
) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    registry = build_registry()
    loaded = {p.name for p in registry.plugins} & {"contrast", "relative"}
    assert loaded == expected
    assert ("contrast" in registry.encoders) is ("contrast" in expected)
    assert ("relative" in registry.strategies) is ("relative" in expected)
