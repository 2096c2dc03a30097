"""The scripts of experiments/ as modules, for the tests that hold them to the library
(they are scripts, not a package: loaded from their files)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def experiment_script(name: str) -> types.ModuleType:
    """``experiments/<name>.py`` loaded as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
