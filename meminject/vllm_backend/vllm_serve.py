"""meminject inside vLLM's own OpenAI server (``vllm serve``): plans loaded as data.

vLLM imports this module by name in its processes; meminject never imports it (it
needs vLLM). Two pieces, each named on ``vllm serve``'s command line:

* ``--worker-cls meminject.vllm_backend.vllm_serve.MemoryWorker``: vLLM's own worker for
  the platform (CPU, or CUDA/ROCm) with :class:`MemoryWorkerExtension
  <meminject.vllm_backend.worker.MemoryWorkerExtension>` mixed in, which, once the model
  has loaded, installs every plan file of the directory ``$MEMINJECT_VLLM_PLANS``
  (written by ``meminject export --format vllm``), each under its file's name. A plan
  is data (hook records and tensors), so nothing is unpickled.
* ``--logits-processors meminject.vllm_backend.vllm_serve:MemoryChoice``: a logits
  processor that changes no logit; vLLM calls its :meth:`MemoryChoice.validate_params`
  on each request as it arrives, so a request naming a plan the server does not have
  is answered 400 before it reaches the workers (where it would stop the engine).

A request chooses a plan with ``"vllm_xargs": {"meminject": NAME}`` and sends the
plan's digest as ``"cache_salt"`` (``meminject export`` prints both), so that prefix
caching never reuses keys and values computed under another set. A request that names
no plan runs without memories.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any

from vllm.sampling_params import SamplingParams  # type: ignore[import-not-found,unused-ignore]
from vllm.v1.sample.logits_processor import (  # type: ignore[import-not-found,unused-ignore]
    LogitsProcessor,
)

from meminject.vllm_backend.plan import CHOICE, PLANS_ENV
from meminject.vllm_backend.worker import MemoryWorkerExtension

log = logging.getLogger("meminject.vllm")


def plans_directory() -> str:
    directory = os.environ.get(PLANS_ENV, "")
    if not directory:
        raise RuntimeError(
            f"meminject: set {PLANS_ENV} to the directory of plan files "
            "(meminject export --format vllm)"
        )
    return directory


@functools.lru_cache(maxsize=4)
def _names(directory: str) -> frozenset[str]:
    from meminject.vllm_backend.plan import plan_files

    return frozenset(plan_files(directory))


class MemoryChoice(LogitsProcessor):  # type: ignore[misc,unused-ignore]
    """Checks each request's plan name as it arrives; changes no logit."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        extra = sampling_params.extra_args or {}
        if "meminject" not in extra:
            return
        name = extra["meminject"]
        names = _names(plans_directory())
        if not isinstance(name, str) or (name and name not in names):
            shown = repr(name)[:80]
            raise ValueError(
                f"vllm_xargs.meminject: no memory plan {shown} on this server; it has: "
                + (", ".join(sorted(names)) or "none")
            )

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        return None

    def apply(self, logits: Any) -> Any:
        return logits


def _memory_worker() -> type:
    """vLLM's worker class for this platform, with the memory extension mixed in and the
    plan files installed after the model loads."""
    from vllm.platforms import current_platform  # type: ignore[import-not-found,unused-ignore]

    if current_platform.is_cpu():
        name = "vllm.v1.worker.cpu_worker.CPUWorker"
    elif current_platform.is_cuda_alike():
        name = "vllm.v1.worker.gpu_worker.Worker"
    else:
        raise RuntimeError(
            f"meminject: MemoryWorker knows vLLM's CPU and CUDA/ROCm workers, not "
            f"{type(current_platform).__name__}"
        )
    module, _, attr = name.rpartition(".")
    base: Any = getattr(importlib.import_module(module), attr)

    class MemoryWorker(base, MemoryWorkerExtension):  # type: ignore[misc,unused-ignore]
        def load_model(self, *args: Any, **kwargs: Any) -> Any:
            result = super().load_model(*args, **kwargs)
            config = self.vllm_config.model_config
            if not config.enforce_eager:
                raise RuntimeError(
                    "meminject: run vllm serve with --enforce-eager (the memories' hooks "
                    "are Python, outside any compiled graph)"
                )
            chosen = [
                p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}"
                for p in (config.logits_processors or [])
            ]
            if CHOICE not in chosen:
                raise RuntimeError(
                    f"meminject: add --logits-processors {CHOICE} (it answers a request "
                    "naming an unknown plan with 400 instead of stopping the engine)"
                )
            names = self.meminject_load_files(plans_directory())
            log.warning("meminject: memory plans installed: %s", ", ".join(names) or "none")
            return result

    MemoryWorker.__module__ = __name__
    MemoryWorker.__qualname__ = "MemoryWorker"
    return MemoryWorker


def __getattr__(name: str) -> Any:
    if name == "MemoryWorker":
        cls = _memory_worker()
        globals()["MemoryWorker"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
