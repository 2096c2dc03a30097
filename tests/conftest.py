"""Shared fixtures: tiny real models built once per session, loaded by path."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# The fuzz run of the loader: python -m pytest tests/unit/test_memfile_properties.py
#   --hypothesis-profile=fuzz   (5,000 examples per test; about 5 minutes on 2 cores)
settings.register_profile("fuzz", max_examples=5_000, deadline=None)
settings.register_profile("default", max_examples=100, deadline=None)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
# The core suite runs on built-ins only, whatever plugins are installed; plugin tests set
# MEMINJECT_LOAD_PLUGINS themselves (monkeypatch) to exercise discovery and filtering.
os.environ.setdefault("MEMINJECT_LOAD_PLUGINS", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Served snapshots (meminject.snapshots) that tests' generate runs write go to a directory
# of this session, never the user's cache; the CLI tests then exercise light loads too.
_SNAPSHOTS = tempfile.mkdtemp(prefix="meminject-test-snapshots-")
os.environ["MEMINJECT_SNAPSHOTS"] = _SNAPSHOTS
atexit.register(shutil.rmtree, _SNAPSHOTS, ignore_errors=True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "memory_injections_paper"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from meminject.testing import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("gpt2", "neox", "llama")}


@pytest.fixture(scope="session")
def gpt2_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["gpt2"]


@pytest.fixture(scope="session")
def gpt2(gpt2_dir: Path):
    from meminject.loading import load_model

    return load_model(gpt2_dir, bridge=True)


@pytest.fixture(scope="session")
def gpt2_raw(gpt2_dir: Path):
    from meminject.loading import load_model

    return load_model(gpt2_dir, coordinates="raw", bridge=True)


@pytest.fixture(scope="session")
def toyworld():
    """The embedded model, loaded once (its weights ship in the package)."""
    from meminject import toyworld as package
    from meminject.loading import load_model

    if not (Path(package.WEIGHTS_DIR) / "model.safetensors").is_file():
        pytest.skip("toyworld weights are not built")
    return load_model("toyworld", bridge=True)


@pytest.fixture(autouse=True)
def _fresh_encodings(request: pytest.FixtureRequest):
    """Session models are shared; their encoding caches must not leak between tests."""
    yield
    for name in ("gpt2", "gpt2_raw", "toyworld"):
        if name in request.fixturenames:
            request.getfixturevalue(name).encodings.clear()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
