"""Plugin hooks (pluggy). One function per hook; each takes a ``register`` callback.

Callbacks instead of return values let one implementation register several
things and let meminject record which plugin registered which name, so a clash
can name both plugins. Implementations may accept fewer arguments than the spec
lists (pluggy passes only what they ask for), so hooks can gain arguments later
without breaking existing plugins.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "meminject"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_encoders(register: Any) -> None:
    """Register encoders that turn a memory's text into a vector.

    Call ``register(name, encoder, params_model=None)``. ``encoder`` is a callable
    taking one :class:`meminject.extension.EncodeRequest` and returning a tensor of
    shape ``[d_model]``. ``params_model`` (a pydantic model) describes the
    encoder's own parameters, the memory's ``[memory.params]`` table; it appears
    in ``meminject schema`` and is validated when files load.
    """


@hookspec
def register_strategies(register: Any) -> None:
    """Register injection strategies.

    Call ``register(strategy_cls)`` (or ``register(name, strategy_cls)``, checked to
    agree). ``strategy_cls`` subclasses :class:`meminject.extension.Strategy`: its
    ``memory_model`` (a subclass of :class:`meminject.schema.MemoryBase` with a field
    ``strategy: Literal["<name>"]``) is the memory's table in a file and states the
    strategy's one name; its ``compile`` turns memories into hooks (build them with
    :func:`meminject.extension.site_hook`).
    """


@hookspec
def register_models(register: Any) -> None:
    """Register named model sources.

    Call ``register(name, loader, description="", *, where=None, prepend_bos=None,
    pull=None)``. ``loader`` takes keyword arguments ``device`` and ``dtype`` (strings
    as the user gave them, or None) and returns a Hugging Face model directory (a
    path), a GGUF file (dequantized once into meminject's cache), a hub name, or a
    loaded ``TransformerBridge``; when the weights are missing it raises
    :class:`meminject.errors.ModelLoadError` saying how to get them. ``meminject
    --model NAME`` and memory files' ``[model] name`` resolve registered names first.

    Optional: ``where()`` says where the weights are, or returns None when they are
    not installed (``meminject models`` shows it; keep it free of heavy imports);
    ``prepend_bos`` is the source's BOS convention (None: TransformerLens's default,
    prepend); ``pull(echo)`` fetches the weights for ``meminject models pull NAME``.
    """


@hookspec
def register_datasets(register: Any) -> None:
    """Register dataset loaders for ``meminject sweep``.

    Call ``register(name, loader, description="", *, options_model=None, suffixes=())``.
    ``loader(path, ...)`` gets the file the user named (``NAME:PATH``, or a file ending in
    one of ``suffixes``), or None for ``sweep NAME``, and returns the rows to evaluate
    (:class:`meminject.datasets.PromptRow`). With ``options_model`` (a pydantic model) the
    user's ``-D KEY=VALUE`` options are validated by it and passed as ``options=``;
    without one, the options given are passed as keyword arguments.
    """


@hookspec
def register_backends(register: Any) -> None:
    """Register backends that run a model's forward passes during generation.

    Call ``register(name, factory, description="", *, auto=False)``. ``factory`` takes
    the :class:`meminject.model_handle.LoadedModel` and returns an object implementing
    :class:`meminject.backends.Backend` (``name``, ``features``, ``unsupported``,
    ``hooks``, ``forward``), or raises :class:`meminject.backends.BackendUnavailable`
    saying why it cannot run that model. It is called once per model, on first use.
    ``meminject generate --backend NAME`` and ``generate(backend=NAME)`` select it;
    with ``auto=True`` it is also a candidate for ``--backend auto``, tried in
    registration order (the built-ins ``hf``, then ``bridge``, come first).
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``meminject`` click group ``cli`` (``@cli.command()``)."""
