"""The ``meminject serve`` command: the OpenAI-compatible server of
:mod:`meminject.serve`, with the memory set validated and compiled before it listens."""

from __future__ import annotations

from collections.abc import Sequence

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
@click.option("--served-name", default=None, help="The model name clients send (default: --model).")
@click.option("--backend", default="auto", show_default=True, help="Generation backend.")
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
    served_name: str | None,
    backend: str,
    allow_outside_paths: bool,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API; each request may choose
    memories by name (body field "memories")."""
    from meminject.errors import BadInputError

    try:
        import uvicorn

        from meminject.serve.app import Server, create_app
        from meminject.serve.batcher import Batcher
    except ImportError as exc:
        raise BadInputError(
            f"meminject serve needs starlette and uvicorn ({exc.name} is missing): "
            "pip install 'meminject[serve]'"
        ) from None
    from meminject.engine import compile_memories
    from meminject.loading import load_memories

    memory_set = load_memories(memory_paths) if memory_paths else None
    model = options.load_cli_model(model_name, memory_set)
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
    server = Server(model, memory_set, batcher, served_name=name, api_key=api_key)
    count = len(memory_set) if memory_set is not None else 0
    click.echo(
        f"meminject: serving '{name}' with {count} memories on http://{host}:{port}/v1",
        err=True,
    )
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
