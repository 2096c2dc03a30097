"""The ``meminject serve`` command: the OpenAI-compatible server of
:mod:`meminject.serve`, with the memory set validated and compiled before it listens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from meminject.cli import options


@click.command()
@options.memories_option("Memory file or directory requests may choose from (repeatable).")
@options.model_option("files")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@options.number_option("--port", 8000, click.IntRange(0, 65535), "TCP port.")
@options.number_option("--batch-size", 8, click.IntRange(1, 256), "Most requests run in one batch.")
@options.number_option(
    "--batch-wait-ms",
    10,
    click.IntRange(0, 60_000),
    "How long the first request of a batch waits for others to join it.",
)
@options.number_option(
    "--max-queue", 64, click.IntRange(1, 100_000), "Waiting requests beyond this get 503."
)
@click.option(
    "--api-key",
    envvar="MEMINJECT_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' (also from $MEMINJECT_API_KEY).",
)
@click.option(
    "--trusted-host",
    "trusted_hosts",
    multiple=True,
    help="A host name clients may send in Host and Origin besides 127.0.0.1, localhost "
    "and --host (repeatable; '*' for any: only behind your own proxy).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="The server's log: errors (with request ids) at warning, cancelled requests at info.",
)
@click.option("--served-name", default=None, help="The model name clients send (default: --model).")
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    help="Generation backend; vllm runs requests on vLLM's async engine (docs/vllm.md).",
)
@options.outside_paths_option
def serve(
    memory_paths: Sequence[str],
    model_name: str | None,
    host: str,
    port: int,
    batch_size: int,
    batch_wait_ms: int,
    max_queue: int,
    api_key: str | None,
    trusted_hosts: Sequence[str],
    log_level: str,
    served_name: str | None,
    backend: str,
    allow_outside_paths: bool,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API; each request may choose
    memories by name (body field "memories")."""
    import logging
    import os

    from meminject.errors import BadInputError

    # An empty key must not mean "no auth": a deployment that meant to set one and got
    # an empty variable would serve everyone (click reads an empty variable as unset).
    from_env = os.environ.get("MEMINJECT_API_KEY")
    if api_key is None and from_env is not None and not from_env.strip():
        raise BadInputError(
            "MEMINJECT_API_KEY is empty; set a key, or unset it to serve without one"
        )
    if api_key is not None and not api_key.strip():
        raise BadInputError("--api-key is empty; give a key, or leave it out to serve without one")
    try:
        import uvicorn

        from meminject.serve.app import LOCAL_HOSTS, Server, create_app
        from meminject.serve.batcher import Batcher
    except ImportError as exc:
        raise BadInputError(
            f"meminject serve needs starlette and uvicorn ({exc.name} is missing): "
            "pip install 'meminject[serve]'"
        ) from None
    from meminject.engine import compile_memories
    from meminject.loading import load_memories

    if backend == "vllm":
        from meminject.vllm_backend import vllm_available

        reason = vllm_available()
        if reason is not None:  # before the model loads
            raise BadInputError(reason)
    memory_set = load_memories(memory_paths) if memory_paths else None
    model = options.load_cli_model(model_name, memory_set)
    batcher: Any
    if backend == "vllm":
        batcher = _vllm_jobs(model, memory_set, batch_size, max_queue, allow_outside_paths)
    else:
        if memory_set is not None:  # bad files stop here, before the port is bound
            compile_memories(model, memory_set, allow_outside_paths=allow_outside_paths)
        batcher = Batcher(
            model,
            batch_size=batch_size,
            wait_s=batch_wait_ms / 1000,
            max_queue=max_queue,
            backend=backend,
            allow_outside_paths=allow_outside_paths,
        )
    name = served_name or model.name
    server = Server(
        model,
        memory_set,
        batcher,
        served_name=name,
        api_key=api_key,
        trusted_hosts=(*LOCAL_HOSTS, host, *trusted_hosts),
        memory_roots=memory_paths,
    )
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    serve_log = logging.getLogger("meminject.serve")
    serve_log.addHandler(handler)
    serve_log.setLevel(log_level.upper())
    count = len(memory_set) if memory_set is not None else 0
    click.echo(
        f"meminject: serving '{name}' with {count} memories on http://{host}:{port}/v1",
        err=True,
    )
    # Idle keep-alive connections close after 5 s; a body must arrive within
    # BODY_TIMEOUT_S (the app answers 408), so a slow client holds no worker.
    try:
        uvicorn.run(
            create_app(server), host=host, port=port, log_level=log_level, timeout_keep_alive=5
        )
    finally:
        close = getattr(batcher, "close", None)
        if backend == "vllm" and close is not None:
            close()


def _vllm_jobs(
    model: Any,
    memory_set: Any,
    batch_size: int,
    max_queue: int,
    allow_outside_paths: bool,
) -> Any:
    """The server's jobs on vLLM's async engine (docs/vllm.md): every memory is checked
    (one line per memory vLLM cannot run, exit 2) before vLLM starts; ``--batch-size``,
    when given, is vLLM's ``max_num_seqs`` (vLLM schedules its own batches)."""
    import os

    from meminject.errors import EXIT_BAD_INPUT
    from meminject.serve.vllm_jobs import VLLMJobs
    from meminject.vllm_backend import prepare, start_async_engine
    from meminject.vllm_backend.plan import NotRunnable, compile_plan

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    _, source, dtype = prepare(model, memory_set)
    if memory_set is not None:
        try:
            compile_plan(model, memory_set, allow_outside_paths=allow_outside_paths)
        except NotRunnable as exc:
            for problem in exc.problems:
                click.echo(f"Error: {problem}", err=True)
            click.get_current_context().exit(EXIT_BAD_INPUT)
    engine_options: dict[str, Any] = {}
    ctx = click.get_current_context()
    if ctx.get_parameter_source("batch_size") is not click.core.ParameterSource.DEFAULT:
        engine_options["max_num_seqs"] = batch_size
    engine = start_async_engine(source, dtype, **engine_options)
    return VLLMJobs(model, engine, max_queue=max_queue, allow_outside_paths=allow_outside_paths)
