"""pytest fixtures for testing meminject plugins against real (tiny) models.

Installed with meminject through the ``pytest11`` entry point, so any test suite in an
environment where meminject is installed can use them without a ``conftest.py``
(disable with ``pytest -p no:meminject``):

- ``meminject_tiny_model_dir`` — a tiny random-weight GPT-2 saved as a Hugging Face
  directory, built once per session (a few seconds; no network).
- ``meminject_tiny_models`` — a session-wide factory ``(arch="gpt2",
  coordinates="processed") -> LoadedModel`` for the GPT-2, GPT-NeoX and Llama tiny
  models; each is built and loaded once (``.dir(arch)`` gives the directory only).
- ``meminject_tiny_model`` — the tiny GPT-2 as a ``LoadedModel`` (processed
  coordinates); its encoding cache is cleared after each test, so one test's vectors
  never leak into the next.
- ``meminject_registry`` — ``(*plugins, entry_points=False) -> Registry``: built-ins plus
  the given (name, module) plugins become the process-wide registry until the test ends.
- ``meminject_memory_file`` — ``(toml, name="memories.toml") -> Path`` in ``tmp_path``.
- ``meminject_cli`` — ``(*args) -> click.testing.Result``: the ``meminject`` command
  line, run in-process against the current registry.

Why real models and not mocks: encoders and strategies are written against
TransformerLens hook points and tensor shapes; a mock would accept code that fails on
the first real model. The tiny models are real architectures with GPT-2's tokenizer
and LayerNorm weights moved away from identity, so processed and raw coordinates differ
as they do on real checkpoints.

This module imports neither torch nor transformer_lens at import time: pytest loads it
in every session, and most sessions never ask for a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from meminject.model_handle import LoadedModel
    from meminject.plugins import Registry


class TinyModels:
    """Tiny real models built and loaded on first use, then kept for the session."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._factory = tmp_path_factory
        self._dirs: dict[str, Path] = {}
        self._loaded: dict[tuple[str, str], LoadedModel] = {}

    def dir(self, arch: str = "gpt2") -> Path:
        """The Hugging Face directory of the tiny ``arch`` model (gpt2, neox, llama)."""
        from meminject.testing import build_tiny_model

        if arch not in self._dirs:
            self._dirs[arch] = build_tiny_model(self._factory.mktemp(f"meminject-{arch}"), arch)
        return self._dirs[arch]

    def __call__(self, arch: str = "gpt2", coordinates: str = "processed") -> LoadedModel:
        """The tiny ``arch`` model loaded through :func:`meminject.load_model`."""
        from meminject.loading import load_model

        key = (arch, coordinates)
        if key not in self._loaded:
            self._loaded[key] = load_model(self.dir(arch), coordinates=coordinates)
        return self._loaded[key]


@pytest.fixture(scope="session")
def meminject_tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Factory of tiny real models, ``(arch="gpt2", coordinates="processed")``, cached for
    the session (building and loading one takes seconds, so tests share them);
    ``.dir(arch)`` gives a model's directory without loading it."""
    return TinyModels(tmp_path_factory)


@pytest.fixture(scope="session")
def meminject_tiny_model_dir(meminject_tiny_models: TinyModels) -> Path:
    """A tiny GPT-2 (2 layers, 4 heads, d_model 64) as a Hugging Face directory."""
    return meminject_tiny_models.dir("gpt2")


@pytest.fixture
def meminject_tiny_model(meminject_tiny_models: TinyModels) -> Iterator[LoadedModel]:
    """The tiny GPT-2, loaded in processed coordinates, with a clean encoding cache."""
    model = meminject_tiny_models("gpt2")
    model.encodings.clear()
    yield model
    model.encodings.clear()


@pytest.fixture
def meminject_registry() -> Iterator[Callable[..., Registry]]:
    """Install a registry of the built-ins plus the given plugins for this test.

    Call it as ``meminject_registry(("my-plugin", my_plugin_module))``. Installed
    plugins are left out unless ``entry_points=True``: an author's own package is
    normally installed in the test environment, and registering it twice would clash.
    The previous process-wide registry comes back when the test ends.
    """
    from meminject import plugins as plugin_module

    previous = plugin_module._registry

    def install(*plugins: tuple[str, object], entry_points: bool = False) -> Registry:
        registry = plugin_module.build_registry(
            extra_plugins=plugins, load_entrypoints=entry_points
        )
        plugin_module.reset_registry(registry)
        return registry

    yield install
    plugin_module.reset_registry(previous)


@pytest.fixture
def meminject_memory_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a memory file into ``tmp_path``: ``meminject_memory_file(toml, name=...)``."""
    from meminject.testing import write_memory_file

    def write(toml: str, name: str = "memories.toml") -> Path:
        return write_memory_file(tmp_path / name, toml)

    return write


@pytest.fixture
def meminject_cli() -> Callable[..., Any]:
    """Run ``meminject ARGS…`` in-process: ``result = meminject_cli("encoders")``."""
    from meminject.testing import invoke_cli

    def run(*args: str) -> Any:
        return invoke_cli(args)

    return run
