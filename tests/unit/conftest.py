"""The unit tier loads no model: tests that need one belong in tests/integration.

Two guards keep it so: a unit test that asks for a model fixture fails at collection,
and inside a unit test loading a model (``load_model``, booting a bridge) raises. Files
written by a unit test are read without a model (memory files, tensors, datasets); a
command a unit test runs stops before it would load one (bad input is refused first).
"""

from __future__ import annotations

from typing import Any

import pytest

#: Fixtures that build or load a model (tests/conftest.py, meminject.pytest_plugin).
MODEL_FIXTURES = frozenset(
    {
        "model_dirs",
        "gpt2_dir",
        "gpt2",
        "gpt2_raw",
        "toyworld",
        "meminject_tiny_models",
        "meminject_tiny_model_dir",
        "meminject_tiny_model",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/unit/" not in item.nodeid.replace("\\", "/"):
            continue
        wanted = sorted(MODEL_FIXTURES & set(getattr(item, "fixturenames", ())))
        if wanted:
            raise pytest.UsageError(
                f"{item.nodeid} is a unit test but asks for {', '.join(wanted)}; "
                "tests that load a model go in tests/integration"
            )


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a unit test loaded a model; move it to tests/integration")


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import meminject.bridge_boot
    import meminject.loading

    monkeypatch.setattr(meminject.loading, "load_model", _refuse)
    monkeypatch.setattr(meminject.loading, "boot_bridge", _refuse)
    monkeypatch.setattr(meminject.bridge_boot, "boot_bridge", _refuse)
