"""Every module of the package imports on its own, in a fresh interpreter.

An import cycle that only works when modules load in one lucky order (a deferred
import here, a module-level one there) shows up as an ImportError for whichever module
a user or a plugin happens to import first; importing each one alone catches it.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import meminject


def all_modules() -> list[str]:
    return sorted(
        info.name for info in pkgutil.walk_packages(meminject.__path__, prefix="meminject.")
    )


def import_alone(name: str) -> tuple[str, int, str]:
    done = subprocess.run(
        [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300
    )
    return name, done.returncode, done.stderr


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    modules = all_modules()
    assert "meminject.backends.hf" in modules and "meminject.generation" in modules
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(import_alone, modules))
    failed = {name: err[-500:] for name, code, err in results if code != 0}
    assert not failed, failed
