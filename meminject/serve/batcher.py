"""Concurrent requests gathered into batches on one worker thread.

Why one thread: the model and its hooks are shared state, so every forward (and every
compile, whose ``layer`` encoder runs the model) happens on the worker; request
handlers only validate and wait. The worker takes the first waiting job, then keeps
gathering for up to ``wait_s`` or until ``batch_size`` jobs, and runs them as one
``generate_batch`` call: each row with its own memory set, options and seed, and each
row's tokens pushed back to its request as they are picked (streaming). A job whose
client has gone is marked cancelled; its row then stops at the next token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meminject.serve.protocol import APIError

if TYPE_CHECKING:
    from meminject.generation import DecodeOptions, Generation, Prompt
    from meminject.memfile import MemorySet
    from meminject.model_handle import LoadedModel


@dataclass(eq=False)
class Job:
    prompt: Prompt
    #: The memory set this request chose (None: no memories), and its cache key.
    memories: MemorySet | None
    memories_key: tuple[Any, ...]
    options: DecodeOptions
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    done: asyncio.Future[Generation] = field(init=False)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.done = self.loop.create_future()


class Batcher:
    def __init__(
        self,
        model: LoadedModel,
        *,
        batch_size: int = 8,
        wait_s: float = 0.01,
        max_queue: int = 64,
        backend: str = "auto",
        allow_outside_paths: bool = False,
    ):
        self.model = model
        self.batch_size = batch_size
        self.wait_s = wait_s
        self.backend = backend
        self.allow_outside_paths = allow_outside_paths
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self._thread = threading.Thread(target=self._work, name="meminject-batcher", daemon=True)
        self._thread.start()

    def compile(self, key: tuple[Any, ...], memories: MemorySet | None) -> Any:
        """The compiled hooks of a memory set, once per distinct choice (worker only)."""
        from meminject.engine import compile_memories

        if memories is None:
            return None
        if key not in self._compiled:
            self._compiled[key] = compile_memories(
                self.model, memories, allow_outside_paths=self.allow_outside_paths
            )
        return self._compiled[key]

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(
                503,
                "the server's queue is full; retry later",
                kind="server_error",
                code="queue_full",
            ) from None

    def close(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, closing = [first], False
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                jobs.append(job)
            self._run([j for j in jobs if not j.cancelled])
            if closing:
                return

    def _run(self, jobs: list[Job]) -> None:
        from meminject.generation import generate_batch

        if not jobs:
            return

        def on_token(index: int, token: int) -> bool:
            job = jobs[index]
            job.loop.call_soon_threadsafe(job.tokens.put_nowait, token)
            return not job.cancelled

        try:
            compiled = [self.compile(job.memories_key, job.memories) for job in jobs]
            results = generate_batch(
                self.model,
                [job.prompt for job in jobs],
                memories_per_prompt=compiled,
                options=[job.options for job in jobs],
                batch_size=len(jobs),
                backend=self.backend,
                on_token=on_token,
            )
        except Exception as exc:  # one batch's failure is its requests' error, not the server's
            for job in jobs:
                job.loop.call_soon_threadsafe(_fail, job, exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.loop.call_soon_threadsafe(_finish, job, result)


def _finish(job: Job, result: Generation) -> None:
    job.tokens.put_nowait(None)
    if not job.done.done():
        job.done.set_result(result)


def _fail(job: Job, exc: Exception) -> None:
    job.tokens.put_nowait(None)
    if not job.done.done():
        job.done.set_exception(exc)
