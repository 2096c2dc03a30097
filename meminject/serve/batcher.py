"""Concurrent requests gathered into batches on one worker thread.

Why one thread: the model and its hooks are shared state, so every forward (and every
compile, whose ``layer`` encoder runs the model) happens on the worker; request
handlers only validate and wait. The worker takes the first waiting job, then keeps
gathering for up to ``wait_s`` or until ``batch_size`` jobs, and runs them as one
``generate_batch`` call: each row with its own memory set, options and seed, and each
row's tokens pushed back to its request as they are picked (streaming).

Requests do not trust each other, so nothing one job does may reach another:

* each job's memories are compiled when it leaves the queue, alone, so a choice that
  fails to compile fails its own request only;
* a row whose scores turn non-finite ends that row only (``generate_batch`` with
  ``on_finish``), and if a batch still fails as a whole, its unanswered jobs are run
  again one at a time, so the error lands on the request that caused it;
* each job is answered as soon as its own row ends, not when the batch's longest row
  does (no head-of-line blocking);
* compiled choices are kept in a least-recently-used cache of ``cache_size`` entries
  keyed by :meth:`~meminject.memfile.MemorySet.choice_key`, so a client sending
  endless distinct τ overrides costs a bounded amount of memory.

A job whose client has gone is marked cancelled: skipped if it has not started, and
its row ends at the next token if it has.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meminject.serve.protocol import APIError

if TYPE_CHECKING:
    from meminject.generation import DecodeOptions, Generation, Prompt
    from meminject.memfile import MemorySet
    from meminject.model_handle import LoadedModel

log = logging.getLogger("meminject.serve")

#: Compiled memory choices kept (least recently used first out).
CACHE_SIZE = 64


class CompiledChoices:
    """The compiled form of recent memory choices, by choice key, at most ``size`` of
    them (least recently used out): a client varying τ per request must not grow the
    server without bound. Both serving engines keep their compiled choices here."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._held: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def get(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """The entry of ``key``, made by ``make()`` when not held."""
        if key in self._held:
            self._held.move_to_end(key)
            return self._held[key]
        value = self._held[key] = make()
        while len(self._held) > self.size:
            self._held.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._held)


@dataclass(eq=False)
class Job:
    prompt: Prompt
    #: The memory set this request chose (None: no memories), and its cache key.
    memories: MemorySet | None
    memories_key: tuple[Any, ...]
    options: DecodeOptions
    loop: asyncio.AbstractEventLoop
    request_id: str = ""
    tokens: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    done: asyncio.Future[Generation] = field(init=False)
    cancelled: bool = False
    #: Set on the worker once the job is answered (its future may resolve later).
    answered: bool = False
    #: Tokens pushed to ``tokens`` so far (a job that streamed some is not rerun).
    pushed: int = 0

    def __post_init__(self) -> None:
        self.done = self.loop.create_future()

    def finish(self, result: Generation | BaseException) -> None:
        """Answer the job from the worker thread (once; later answers are ignored)."""
        if self.answered:
            return
        self.answered = True
        if isinstance(result, BaseException):
            self.loop.call_soon_threadsafe(_fail, self, result)
        else:
            self.loop.call_soon_threadsafe(_finish, self, result)
            if result.finish_reason == "cancelled" or self.cancelled:
                log.info(
                    "request %s cancelled (client gone) after %d tokens",
                    self.request_id,
                    len(result.new_tokens),
                )


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
        cache_size: int = CACHE_SIZE,
    ):
        self.model = model
        self.batch_size = batch_size
        self.wait_s = wait_s
        self.backend = backend
        self.allow_outside_paths = allow_outside_paths
        self.cache_size = cache_size
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._compiled = CompiledChoices(cache_size)
        self._thread = threading.Thread(target=self._work, name="meminject-batcher", daemon=True)
        self._thread.start()

    def compile(self, key: tuple[Any, ...], memories: MemorySet | None) -> Any:
        """The compiled hooks of a memory set, from the cache when this choice was
        compiled lately (worker only)."""
        from meminject.engine import compile_memories

        if memories is None:
            return None
        return self._compiled.get(
            key,
            lambda: compile_memories(
                self.model, memories, allow_outside_paths=self.allow_outside_paths
            ),
        )

    def cached(self) -> int:
        """How many compiled choices are held (at most ``cache_size``)."""
        return len(self._compiled)

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(
                503,
                "the server's queue is full; retry later",
                kind="server_error",
                code="queue_full",
                headers={"Retry-After": "1"},
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
            for job in jobs:
                if job.cancelled:
                    log.info("request %s cancelled (client gone) before it ran", job.request_id)
            try:
                self._run([j for j in jobs if not j.cancelled])
            except BaseException as exc:  # never let the worker die: answer and go on
                for job in jobs:
                    job.finish(exc)
            if closing:
                return

    def _run(self, jobs: list[Job]) -> None:
        """Compile each job alone, run the ones that compiled as one batch, and if the
        batch fails as a whole run its unanswered jobs one at a time."""
        ready: list[tuple[Job, Any]] = []
        for job in jobs:
            try:
                ready.append((job, self.compile(job.memories_key, job.memories)))
            except Exception as exc:  # this job's choice, this job's error
                job.finish(exc)
        if not ready:
            return
        try:
            self._generate(ready)
        except Exception as exc:
            left = [(job, compiled) for job, compiled in ready if not job.answered]
            if len(ready) == 1:  # alone already: the error is its own
                for job, _ in left:
                    job.finish(exc)
                return
            for one in left:
                if one[0].pushed:  # its client has seen tokens: a rerun would repeat them
                    one[0].finish(exc)
                    continue
                try:
                    self._generate([one])
                except Exception as alone:
                    one[0].finish(alone)

    def _generate(self, ready: list[tuple[Job, Any]]) -> None:
        from meminject.generation import generate_batch

        jobs = [job for job, _ in ready]

        def on_token(index: int, token: int) -> bool:
            job = jobs[index]
            job.pushed += 1
            job.loop.call_soon_threadsafe(job.tokens.put_nowait, token)
            return not job.cancelled

        def on_finish(index: int, result: Any) -> None:
            jobs[index].finish(result)

        generate_batch(
            self.model,
            [job.prompt for job in jobs],
            memories_per_prompt=[compiled for _, compiled in ready],
            options=[job.options for job in jobs],
            batch_size=len(jobs),
            backend=self.backend,
            on_token=on_token,
            on_finish=on_finish,
        )


def _finish(job: Job, result: Generation) -> None:
    job.tokens.put_nowait(None)
    if not job.done.done():
        job.done.set_result(result)


def _fail(job: Job, exc: BaseException) -> None:
    job.tokens.put_nowait(None)
    if not job.done.done():
        job.done.set_exception(exc)
