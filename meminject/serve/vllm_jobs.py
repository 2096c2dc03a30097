"""``meminject serve --backend vllm``: the server's jobs run on vLLM's async engine.

The HTTP side is unchanged (:mod:`meminject.serve.app`: the same routes, validation,
errors and streaming); only :class:`VLLMJobs` replaces the :class:`Batcher
<meminject.serve.batcher.Batcher>`. vLLM does the batching: every request is added to
its engine as it arrives (continuous batching: a request joins the running batch at the
next step), each carrying its memory choice, so requests with different memory sets
share steps, each with its own set (:mod:`meminject.vllm_backend.worker`).

A request's memory choice compiles on meminject's own copy of the model (the server
keeps it: encoders such as ``layer`` run it, and it tokenizes), alone, on a thread, so
a choice that fails fails only its request. The compiled plan is installed in vLLM's
workers under its digest, which is also the request's prefix-cache salt. Compiled
choices are kept in a least-recently-used cache of ``cache_size`` entries; plans no
running request uses are dropped from the workers beyond that many, so a client sending
endless distinct τ overrides costs a bounded amount of memory, here and in the workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from meminject.serve.batcher import CACHE_SIZE, CompiledChoices, Job
from meminject.serve.protocol import APIError

if TYPE_CHECKING:
    from meminject.model_handle import LoadedModel
    from meminject.vllm_backend.plan import MemoryPlan

log = logging.getLogger("meminject.serve")


class VLLMJobs:
    """Jobs submitted by the routes, run on a ``vllm`` ``AsyncLLM`` with meminject's
    worker extension."""

    def __init__(
        self,
        model: LoadedModel,
        engine: Any,
        *,
        max_queue: int = 64,
        allow_outside_paths: bool = False,
        cache_size: int = CACHE_SIZE,
    ):
        self.model = model
        self.engine = engine
        self.max_queue = max_queue
        self.allow_outside_paths = allow_outside_paths
        self.cache_size = cache_size
        #: choice key → compiled plan (None: no memories), least recently used first.
        self._compiled = CompiledChoices(cache_size)
        self._compile_lock = threading.Lock()  # the model runs one compile at a time
        #: digest → how many running requests use it, for the plans the workers hold
        #: (least recently used first).
        self._installed: OrderedDict[str, int] = OrderedDict()
        self._install_lock: asyncio.Lock | None = None
        self._running: set[asyncio.Task[None]] = set()

    # -- the routes' side -------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if len(self._running) >= self.max_queue:
            raise APIError(
                503,
                "the server's queue is full; retry later",
                kind="server_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        task = asyncio.ensure_future(self._run(job))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def cached(self) -> int:
        """How many compiled choices are held (at most ``cache_size``)."""
        return len(self._compiled)

    def installed(self) -> int:
        """How many plans the workers hold."""
        return len(self._installed)

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    # -- one job ------------------------------------------------------------------------

    def _compile(self, key: tuple[Any, ...], memories: Any) -> MemoryPlan | None:
        """The plan of a memory choice, from the cache when compiled lately (on a
        thread; one compile at a time, since compiling may run the model)."""
        from meminject.vllm_backend.plan import compile_plan

        if memories is None:
            return None

        def make() -> MemoryPlan | None:
            plan = compile_plan(self.model, memories, allow_outside_paths=self.allow_outside_paths)
            return plan if plan else None

        with self._compile_lock:
            return self._compiled.get(key, make)

    async def _acquire(self, plan: MemoryPlan) -> str:
        """Install ``plan`` in the workers (if they lack it) and count a user of it.
        Plans no request uses are dropped beyond ``cache_size``."""
        digest = plan.digest()
        assert digest is not None
        if self._install_lock is None:
            self._install_lock = asyncio.Lock()
        async with self._install_lock:
            if digest not in self._installed:
                unused = [d for d, users in self._installed.items() if users == 0]
                drop = unused[: max(0, len(self._installed) + 1 - self.cache_size)]
                if drop:
                    await self.engine.collective_rpc("meminject_drop", args=(drop,))
                    for d in drop:
                        del self._installed[d]
                await self.engine.collective_rpc("meminject_add", args=({digest: plan.payload()},))
                self._installed[digest] = 0
            self._installed[digest] += 1
            self._installed.move_to_end(digest)
        return digest

    def _release(self, digest: str) -> None:
        if digest in self._installed:
            self._installed[digest] -= 1

    async def _run(self, job: Job) -> None:
        from meminject.generation import prompt_ids
        from meminject.vllm_backend import sampling_params, to_generation

        loop = asyncio.get_running_loop()
        digest = None
        rid = f"{job.request_id or 'req'}-{uuid.uuid4().hex[:8]}"
        try:
            if job.cancelled:
                log.info("request %s cancelled (client gone) before it ran", job.request_id)
                job.finish(APIError(499, "cancelled"))
                return
            plan = await loop.run_in_executor(None, self._compile, job.memories_key, job.memories)
            ids = await loop.run_in_executor(None, prompt_ids, self.model, job.prompt)
            request: dict[str, Any] = {"prompt_token_ids": ids}
            extra = {"meminject": ""}
            if plan:
                digest = await self._acquire(plan)
                request["cache_salt"] = digest
                extra["meminject"] = digest
            params = sampling_params(job.options, extra)
            last = None
            async for out in self.engine.generate(request, params, rid):
                last = out
                tokens = out.outputs[0].token_ids
                for token in tokens[job.pushed :]:
                    job.tokens.put_nowait(int(token))
                job.pushed = len(tokens)
                if job.cancelled:
                    await self.engine.abort(rid)
                    break
            if last is None:
                raise RuntimeError("vLLM returned no output")
            text = job.prompt if isinstance(job.prompt, str) else str(job.prompt)
            result = to_generation(self.model.tokenizer, text, ids, job.options, last)
            if job.cancelled:
                result = dataclasses.replace(result, finish_reason="cancelled")
            job.finish(result)
        except asyncio.CancelledError:
            job.finish(APIError(499, "cancelled"))
            raise
        except Exception as exc:  # this job's error, answered to this job only
            job.finish(_engine_error(exc))
        finally:
            if digest is not None:
                self._release(digest)


def _engine_error(exc: Exception) -> Exception:
    """vLLM's own refusals of a request (its parameters, its length) as 400s."""
    from meminject.errors import MeminjectError

    if isinstance(exc, ValueError) and not isinstance(exc, MeminjectError):
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return APIError(400, message[:500])
    return exc
