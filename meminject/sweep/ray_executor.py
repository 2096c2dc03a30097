"""The sweep on Ray: :func:`run_sweep_ray` splits a sweep's rows into shards, runs each
as a Ray task on a local Ray instance or a cluster, and gathers their records, which are
the records :func:`~meminject.sweep.run.run_sweep` gives in one process.

How it stays the local run:

* **Same batches.** The driver tokenizes the rows and batches them by the local rule
  (:func:`~meminject.sweep.rows.batch_indices`); a task gets whole batches, dealt round
  robin (so tasks get long and short prompts alike), and its own ``run_sweep`` batches
  them back into exactly those batches. A row meets the same batch mates, so its numbers
  are the local run's bit for bit (given the same device and torch threads).
* **Same settings.** Residual-stream norms (``--tau-units resid_norm``) are measured once,
  by the driver, over every row, and travel in the config; controls depend only on the
  seed and the row's id.
* **Same model.** A task receives plain data (:class:`WorkerModel`: the name or
  absolute path, device type, dtype, coordinates, the resolved BOS choice, a digest of
  the checkpoint's files, and the torch thread count the driver loaded with, since the
  last bits of the processed weights depend on it), loads the model once per worker
  process, and refuses to run when its checkpoint files, its model's facts or its
  meminject, torch, TransformerLens or transformers version differ from the driver's.
  A model path must therefore exist on every node (or be a registered model, resolved
  on each node). Each task also returns the hash of its weights as processed (the
  bridge's state dict, :meth:`~meminject.model_handle.LoadedModel.legacy_fingerprint`);
  when one differs from the driver's (another kind of CPU or GPU), the driver warns
  that records agree to float precision rather than bit for bit.

What travels: the job as a dict of plain values, a task's rows as dicts, and an actor
handle for progress; what comes back: the records frame and counts (or an error's text
and exit code). No meminject object is pickled, and no pickle switch is turned on.

Resume: the driver checkpoints every finished task's records through ``checkpoint``
(:class:`~meminject.sweep.records.SweepFiles`), and ``done`` skips the rows an earlier
run finished, exactly as ``run_sweep`` does, so a Ray run resumes a local one and back.

``ray`` is imported only inside functions: nothing light imports it, and a missing Ray
is one line saying how to install it.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError, MeminjectError
from meminject.sweep.config import SweepConfig
from meminject.sweep.records import SweepResult, finished_records, with_previous
from meminject.sweep.rows import batch_indices, shard_rows, tokenize_row
from meminject.sweep.run import check_sweep, progress_bar, run_sweep, with_baselines, with_norms

if TYPE_CHECKING:
    import pandas as pd

    from meminject.datasets import PromptRow
    from meminject.model_handle import LoadedModel
    from meminject.plugins import Registry

#: How to get Ray, as every "not installed" message says it.
INSTALL_RAY = 'pip install "meminject[ray]"'
#: Default tasks per task the cluster can run at once: slack for uneven tasks, and an
#: interruption loses only the tasks in flight, about a quarter of the run at worst.
TASKS_PER_SLOT = 4
#: Packages whose versions must match between the driver and every worker.
VERSIONED = ("meminject", "torch", "transformer-lens", "transformers")
#: How often a worker reports its passes to the progress counter, in seconds.
REPORT_EVERY = 0.5
#: How long a report or a reading of the progress counter may wait, in seconds; past it,
#: progress is no longer counted in passes (the sweep goes on).
COUNTER_TIMEOUT = 20.0


def ray_installed() -> bool:
    """Whether Ray can be imported here (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def require_ray() -> None:
    """A one-line error (exit 2) saying how to install Ray, when it is missing."""
    if not ray_installed():
        raise BadInputError(f"--executor ray needs Ray, which is not installed: {INSTALL_RAY}")


def _import_ray() -> Any:
    require_ray()
    import ray

    return ray


class WorkerError(MeminjectError):
    """What a Ray task refused or failed with, raised again on the driver with the
    worker's exit code (a bad input on a worker is a bad input)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class WorkerModel:
    """How a worker loads the driver's model: plain data, resolved on the driver so that
    no default is decided again on another machine."""

    #: A registered model (resolved on each node), an absolute path (which must exist on
    #: every node), or a hub name.
    name: str
    #: The driver's device type (``cpu``, ``cuda``: one GPU per task, Ray picks which).
    device: str
    dtype: str
    coordinates: str
    prepend_bos: bool
    allow_pickle_weights: bool
    #: :func:`checkpoint_digest` of the driver's model (None for a hub name).
    files: str | None
    #: Torch threads the driver loaded with (``LoadedModel.load_threads``; else its
    #: current count): processing the weights (folding LayerNorm, centring) sums floats,
    #: and the last bits of the result depend on the thread count.
    load_threads: int

    @classmethod
    def of(
        cls, model: LoadedModel, registry: Registry, *, allow_pickle_weights: bool = False
    ) -> WorkerModel:
        from pathlib import Path

        import torch

        from meminject.dtypes import dtype_name

        name = model.name
        if name not in registry.models:  # a registered name wins, as in load_model
            path = Path(name).expanduser()
            if path.exists():
                name = str(path.resolve())  # workers do not share the driver's directory
        return cls(
            name=name,
            device=model.device.type,
            dtype=dtype_name(model.dtype),
            coordinates=model.coordinates,
            prepend_bos=model.prepend_bos,
            allow_pickle_weights=allow_pickle_weights,
            files=checkpoint_digest(model),
            load_threads=model.load_threads or torch.get_num_threads(),
        )


#: The files of a Hugging Face model directory that make the model: configuration,
#: weights and tokenizer (a README or another checkpoint beside them does not count).
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",
)


def checkpoint_digest(model: LoadedModel) -> str | None:
    """A digest of the contents of the files ``model`` was loaded from: the GGUF file
    the user (or a registered source) named, else the model directory's
    :data:`CHECKPOINT_FILES`; None for a hub name (nothing local to compare). Contents,
    not paths or times, so a copy on another node has the same digest."""
    import hashlib
    from pathlib import Path

    path = Path(model.origin or model.source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted({p for pattern in CHECKPOINT_FILES for p in path.glob(pattern)})
        files = [p for p in files if p.is_file()]
    else:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return f"blake2b:{digest.hexdigest()}"


def task_job(
    spec: WorkerModel, model: LoadedModel, config: SweepConfig, threads: int
) -> dict[str, Any]:
    """What every task of a run receives besides its rows, as plain data: how to load
    the model and what it must be, the sweep's settings (its rows are the task's
    shard), torch threads, the plugin choice and the driver's package versions."""
    from meminject.plugins import ENV_VAR

    return {
        "model": dataclasses.asdict(spec),
        "config": dataclasses.asdict(dataclasses.replace(config, shard=(0, 1))),
        "facts": model.facts.to_json(),
        "threads": threads,
        "plugins": os.environ.get(ENV_VAR),
        "versions": versions(),
    }


def task_batches(batches: Sequence[list[int]], n_tasks: int) -> list[list[list[int]]]:
    """Batches dealt round robin to ``n_tasks`` tasks (none left empty): each task gets
    long and short prompts alike, and its batches in the local order, so its own
    batching gives back the same batches (the last, short batch is the last of its task)."""
    n_tasks = max(1, min(n_tasks, len(batches)))
    return [list(batches[j::n_tasks]) for j in range(n_tasks)]


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# --------------------------------------------------------------------------- the worker

#: This worker process's model, loaded by its first task and reused by the next ones.
_LOADED: dict[WorkerModel, LoadedModel] = {}


def _registry(plugins: str | None) -> Registry:
    """The registry the driver had: the same ``MEMINJECT_LOAD_PLUGINS`` choice."""
    from meminject.plugins import ENV_VAR, build_registry, get_registry, reset_registry

    current = os.environ.get(ENV_VAR)
    if current != plugins:
        if plugins is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = plugins
        reset_registry(build_registry())
    return get_registry()


def _model(spec: WorkerModel, facts: dict[str, Any], registry: Registry) -> LoadedModel:
    import torch

    from meminject.errors import ModelLoadError
    from meminject.loading import load_model

    if spec not in _LOADED:
        _LOADED.clear()  # one model per worker process
        threads = torch.get_num_threads()
        torch.set_num_threads(spec.load_threads)  # the driver's processed weights
        try:
            model = load_model(
                spec.name,
                device=spec.device,
                dtype=spec.dtype,
                coordinates=spec.coordinates,
                prepend_bos=spec.prepend_bos,
                allow_pickle_weights=spec.allow_pickle_weights,
                registry=registry,
                bridge=True,  # the sweep runs on the bridge, as the driver's did
            )
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"{exc} (with --executor ray the model must load on every node: a "
                "registered model, or a path that exists on each)"
            ) from None
        finally:
            torch.set_num_threads(threads)
        if spec.files is not None and checkpoint_digest(model) != spec.files:
            raise BadInputError(
                f"the files this worker loaded '{spec.name}' from are not the driver's "
                f"({checkpoint_digest(model)}, not {spec.files}); put the same files at "
                "that path on every node, or use a registered model"
            )
        if model.facts.to_json() != facts:
            raise BadInputError(
                f"the model this worker loaded as '{spec.name}' is not the driver's "
                f"({model.facts.to_json()}, not {facts})"
            )
        _LOADED[spec] = model
    return _LOADED[spec]


class _Reporter:
    """Passes done, sent to the progress counter (an actor handle and this run's key)
    at most every :data:`REPORT_EVERY` seconds (fire and forget)."""

    def __init__(self, counter: tuple[Any, str]) -> None:
        self.counter, self.run = counter
        self.pending = 0
        self.last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.last >= REPORT_EVERY:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send what is pending; ``wait``: until the counter has it (a task's last
        report, so the driver's count is whole once every task has returned). The count
        only moves a progress bar: a counter that cannot be reached stops the reports,
        never the task whose records are the result."""
        if self.pending and self.counter is not None:
            import ray

            try:
                sent = self.counter.add.remote(self.run, self.pending)
                if wait:
                    ray.get(sent, timeout=COUNTER_TIMEOUT)
            except (ray.exceptions.RayError, TimeoutError):
                self.counter = None
        self.pending = 0
        self.last = time.monotonic()


def sweep_task(
    job: dict[str, Any], rows: list[dict[str, Any]], counter: tuple[Any, str]
) -> dict[str, Any]:
    """One Ray task: load the model (once per worker process), run ``run_sweep`` over
    ``rows`` (whole batches, in the driver's order) and return the records frame and the
    counts. Everything in and out is plain data; a meminject error comes back as its
    text and exit code (``{"error": …}``), prefixed with the node it happened on."""
    import socket

    import torch

    from meminject.datasets import PromptRow

    node = socket.gethostname()
    try:
        mine = versions()
        if mine != job["versions"]:
            differ = ", ".join(
                f"{name} {mine[name]} (driver: {job['versions'][name]})"
                for name in VERSIONED
                if mine[name] != job["versions"].get(name)
            )
            raise BadInputError(
                f"this worker runs {differ}; install the same versions on every node"
            )
        torch.set_num_threads(int(job["threads"]))
        registry = _registry(job["plugins"])
        model = _model(WorkerModel(**job["model"]), job["facts"], registry)
        fields = dict(job["config"])
        for name in ("layers", "taus", "encodings", "shard", "baselines"):
            fields[name] = tuple(fields[name])
        if fields["heads"] is not None:
            fields["heads"] = tuple(fields["heads"])
        for name in ("resid_norms", "shuffled"):
            if fields[name] is not None:
                fields[name] = tuple(tuple(pair) for pair in fields[name])
        config = SweepConfig(**fields)
        report = _Reporter(counter)
        result = run_sweep(
            model,
            [PromptRow(**row) for row in rows],
            config,
            registry=registry,
            advance=report,
        )
        report.flush(wait=True)
    except MeminjectError as exc:
        return {"error": f"on node {node}: {exc}", "exit_code": exc.exit_code}
    return {
        "records": result.records,
        "stats": result.stats,
        "worker": (node, os.getpid()),
        "weights": model.legacy_fingerprint(),
    }


class PassCounter:
    """A Ray actor the tasks report their forward passes to, per run, so the driver's
    progress bar counts the passes of every worker.

    It runs its calls out of order (several threads, a lock around the sum): an ordered
    actor waits for each caller's calls by sequence number, and a task cancelled while it
    sent a report leaves a gap in its worker's numbers, after which that worker's next
    report (from its next task, in a resumed run) waits 30 s and fails."""

    def __init__(self) -> None:
        import threading

        self.done: dict[str, int] = {}
        self.lock = threading.Lock()

    def add(self, run: str, n: int) -> None:
        with self.lock:
            self.done[run] = self.done.get(run, 0) + n

    def value(self, run: str) -> int:
        return self.done.get(run, 0)

    def forget(self, run: str) -> None:
        self.done.pop(run, None)


#: The progress counter of this driver's Ray job, made once and kept: a new actor each
#: run would take an idle worker process (one that holds the model) and end it with
#: itself, and the next run would load the model again.
_COUNTERS: dict[Any, Any] = {}


def _counter(ray: Any) -> Any:
    context = ray.get_runtime_context()
    # Job ids restart with each new cluster; the driver's node id does not repeat.
    job = (context.get_node_id(), context.get_job_id())
    if job not in _COUNTERS:
        _COUNTERS.clear()
        _COUNTERS[job] = ray.remote(PassCounter).options(num_cpus=0, max_concurrency=4).remote()
    return _COUNTERS[job]


# --------------------------------------------------------------------------- the driver


def check_address(address: str) -> None:
    """Fail in seconds when nothing listens at ``address`` (``ray.init`` would retry for
    minutes); ``auto`` and addresses without a port are left to Ray."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            pass
    except OSError as exc:
        raise BadInputError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` and pass the address it prints"
        ) from None


def connect(address: str | None) -> bool:
    """Connect to Ray: the cluster at ``address`` (``auto``: the one ``ray start`` runs on
    this machine); without one, the cluster ``RAY_ADDRESS`` names, else a new local
    instance on this machine's cores. (Ray's own default would also join a cluster that
    ``ray start`` left on this machine, and wait minutes when that one is gone.) True
    when this call connected, so the caller disconnects."""
    import logging

    ray = _import_ray()
    if ray.is_initialized():
        return False
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address not in ("auto", "local"):
        check_address(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    except (ConnectionError, ValueError) as exc:
        raise BadInputError(f"could not connect to Ray at {address}: {exc}") from None
    return True


def _slots(ray: Any, threads: int, gpu: bool) -> int:
    """How many tasks the cluster can run at once: per live node, as many as its CPUs
    hold ``threads`` each (and no more than its GPUs, for GPU tasks)."""
    total = 0
    for node in ray.nodes():
        if not node.get("Alive", False):
            continue
        resources = node.get("Resources", {})
        fit = int(resources.get("CPU", 0) // threads)
        if gpu:
            fit = min(fit, int(resources.get("GPU", 0)))
        total += fit
    return total


def _in_order(frames: list[pd.DataFrame], position: dict[int, int]) -> pd.DataFrame:
    """The tasks' records in the local run's order: by the row's place in the dataset,
    each row's records as ``records_frame`` wrote them."""
    import numpy as np
    import pandas as pd

    merged = pd.concat(frames, ignore_index=True)
    order = np.argsort(merged["row_id"].map(position).to_numpy(), kind="stable")
    return merged.iloc[order].reset_index(drop=True)


def run_sweep_ray(
    model: LoadedModel,
    rows: Sequence[PromptRow],
    config: SweepConfig,
    *,
    address: str | None = None,
    tasks: int | None = None,
    threads: int = 1,
    allow_pickle_weights: bool = False,
    registry: Registry | None = None,
    progress: bool = False,
    done: pd.DataFrame | None = None,
    checkpoint: Callable[[pd.DataFrame], None] | None = None,
) -> SweepResult:
    """:func:`~meminject.sweep.run.run_sweep` on Ray: the same records, computed by
    ``tasks`` Ray tasks (default: :data:`TASKS_PER_SLOT` per task the cluster can run at
    once, at most one per batch), each ``threads`` CPU threads (and one GPU when
    ``model`` is on one). ``model`` is the driver's copy: it checks the settings,
    tokenizes the rows and measures τ's norms; each worker loads its own (see
    :class:`WorkerModel`). Uses the Ray connection this process has, else connects
    (:func:`connect`, ``address``) and disconnects at the end.

    ``done`` and ``checkpoint`` are ``run_sweep``'s: rows ``done`` finished are not run
    again, and ``checkpoint`` gets every finished row's records each time a task ends.
    """
    from meminject.plugins import get_registry

    started = time.perf_counter()
    registry = registry or get_registry()
    check_sweep(model, config, registry)
    if threads < 1:
        raise BadInputError("threads must be >= 1")
    if tasks is not None and tasks < 1:
        raise BadInputError("--tasks must be >= 1")
    config = with_baselines(rows, with_norms(model, rows, config))
    mine = shard_rows(rows, config.shard)
    previous = finished_records(done, config) if done is not None else None
    if previous is not None:
        finished_ids = set(previous["row_id"].tolist())
        mine = [row for row in mine if row.row_id not in finished_ids]
    if not mine:  # nothing left to run: the local path says so in the same words
        return run_sweep(model, rows, config, registry=registry, done=done)
    # Tokenized here as each task will: bad rows fail now, and batches are the local ones.
    lengths = [len(tokenize_row(model, row, config.metric).input_ids) for row in mine]
    batches = batch_indices(lengths, config.batch_size)
    spec = WorkerModel.of(model, registry, allow_pickle_weights=allow_pickle_weights)
    job = task_job(spec, model, config, threads)
    gpu = spec.device == "cuda"
    ray = _import_ray()
    connected = connect(address)
    pending: list[Any] = []
    counter = None
    try:
        slots = _slots(ray, threads, gpu)
        if slots < 1:
            cpus = f"{threads} CPU{'s' if threads > 1 else ''}"
            need = f"{cpus} and a GPU" if gpu else cpus
            raise BadInputError(
                f"no node of the Ray cluster has {need} for a task (--threads sets the CPUs)"
            )
        groups = task_batches(batches, tasks or TASKS_PER_SLOT * slots)
        # max_calls=0: a worker process stays up between tasks (Ray's default for GPU
        # tasks is one call each), so it loads the model once.
        remote = ray.remote(num_cpus=threads, num_gpus=1 if gpu else 0, max_calls=0)(sweep_task)
        counter = _counter(ray)
        run = uuid.uuid4().hex
        which: dict[Any, int] = {}
        for j, group in enumerate(groups):
            payload = [dataclasses.asdict(mine[i]) for batch in group for i in batch]
            ref = remote.remote(job, payload, (counter, run))
            which[ref] = j
            pending.append(ref)
        frames: list[pd.DataFrame] = []
        counts: list[dict[str, Any]] = []
        workers: set[Any] = set()
        differ: set[Any] = set()
        position = {row.row_id: k for k, row in enumerate(mine)}
        columns = _task_columns()
        counting, passes = True, 0
        with progress_bar(progress, "sweep · ray", *columns) as bar:
            bar_task = bar.add_task(
                "sweep",
                total=len(batches) * config.passes_per_batch,
                tasks_done=0,
                tasks=len(groups),
            )
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=REPORT_EVERY)
                for ref in ready:
                    out = _result(ray, ref, which[ref])
                    frames.append(out["records"])
                    counts.append(out["stats"])
                    workers.add(tuple(out["worker"]))
                    if out["weights"] != model.legacy_fingerprint():
                        differ.add(tuple(out["worker"]))
                    if checkpoint is not None:
                        checkpoint(with_previous(previous, _in_order(frames, position)))
                if counting:
                    try:
                        passes = ray.get(counter.value.remote(run), timeout=COUNTER_TIMEOUT)
                    except (ray.exceptions.RayError, TimeoutError):
                        counting = False  # the bar counts tasks only from here
                bar.update(bar_task, completed=passes, tasks_done=len(frames))
    finally:
        for ref in pending:  # an error or an interruption: stop what still runs
            ray.cancel(ref)
        if counter is not None:
            counter.forget.remote(run)
        if connected:
            ray.shutdown()
    stats: dict[str, Any] = {
        "rows": len(mine),
        "cells": config.n_cells,
        **{
            key: sum(c[key] for c in counts)
            for key in (
                "base_passes",
                "reference_passes",
                "replays",
                "full_passes",
                "fallback_batches",
            )
        },
        "resumed_rows": 0 if previous is None else previous["row_id"].nunique(),
        "seconds": time.perf_counter() - started,
        "tasks": len(groups),
        "workers": len(workers),
    }
    if config.resid_norms:
        stats["resid_norms"] = dict(config.resid_norms)
    if differ:
        warnings.warn(
            f"the weights of model '{model.name}' as {len(differ)} Ray worker(s) processed "
            "them differ from the driver's in their last bits (another kind of CPU or GPU): "
            "the records agree with a local run to float precision, not bit for bit",
            RuntimeWarning,
            stacklevel=2,
        )
    if stats["fallback_batches"]:
        warnings.warn(
            f"model '{model.name}': re-running layers from ℓ does not reproduce the full "
            f"forward pass on {stats['fallback_batches']} batches; they ran as full passes "
            "(correct, but slower)",
            RuntimeWarning,
            stacklevel=2,
        )
    records = with_previous(previous, _in_order(frames, position))
    return SweepResult(records=records, config=config, stats=stats)


def _task_columns() -> tuple[Any, ...]:
    from rich.progress import TextColumn

    return (TextColumn("{task.fields[tasks_done]}/{task.fields[tasks]} tasks"),)


def _result(ray: Any, ref: Any, index: int) -> dict[str, Any]:
    """A finished task's output; its error raised here, as one line."""
    try:
        out: dict[str, Any] = ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise ray_failure(exc, f"Ray task {index} failed") from exc
    if "error" in out:
        raise WorkerError(f"Ray task {index} {out['error']}", int(out["exit_code"]))
    return out


def ray_failure(exc: BaseException, what: str) -> MeminjectError:
    """A Ray error (a task that raised, a worker or actor that died) as one line: the
    cause's first line, or, when a worker could not import meminject's code, what to
    install where."""
    import re

    cause = getattr(exc, "cause", None) or exc
    text = str(cause)
    missing = re.search(r"No module named '([^']+)'", text)
    if missing:
        return MeminjectError(
            f"{what}: a Ray worker cannot import {missing.group(1)}; install the same "
            "meminject (and its dependencies) on every node"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return MeminjectError(f"{what}: {type(cause).__name__}: {lines[0] if lines else ''}")
