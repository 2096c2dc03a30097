"""Compile a memory set into hooks and keep them installed exactly as long as needed.

Compilation happens once per activation of a set: encoders run here (cached per
(memory, model) on the :class:`LoadedModel`), never inside a hook. Each hook
point gets one function that runs every strategy body for that point in turn.
Hooks are removed when the ``inject`` block ends, also when it ends by an
exception, and the bridge's ``use_attn_result`` flag is put back as it was.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from meminject.backends.bridge import BridgeBackend
from meminject.dtypes import dtype_name
from meminject.errors import (
    BadInputError,
    InjectionError,
    Location,
    MeminjectError,
    MemoryFileError,
    PluginError,
)
from meminject.extension import EncodeRequest, InjectionContext, SiteHook
from meminject.memfile import (
    MemoryEntry,
    MemorySet,
    check_against_model,
    load_memory_set,
    memories_from_tables,
)
from meminject.plugins import Registry, get_registry

if TYPE_CHECKING:
    import torch

    from meminject.model_handle import LoadedModel

#: A loaded set; a path or paths to files and directories; or ``[[memory]]`` tables as
#: dicts (one, or a list), validated as a file's would be.
MemoriesLike: TypeAlias = (
    MemorySet
    | str
    | os.PathLike[str]
    | Sequence[str | os.PathLike[str]]
    | Mapping[str, Any]
    | Sequence[Mapping[str, Any]]
)

_CACHE_EXCLUDE = {"name", "tau", "enabled", "positions", "strategy"}


def as_memory_set(memories: MemoriesLike, registry: Registry | None = None) -> MemorySet:
    """Accept a loaded set, paths to files and directories, or memory tables (dicts)."""
    if isinstance(memories, MemorySet):
        return memories
    registry = registry or get_registry()
    if isinstance(memories, (str, os.PathLike)):
        return load_memory_set([Path(memories)], registry)
    if isinstance(memories, Mapping):
        return memories_from_tables(memories, registry=registry)
    listed = list(memories)
    if listed and all(isinstance(m, Mapping) for m in listed):
        return memories_from_tables(listed, registry=registry)  # type: ignore[arg-type]
    return load_memory_set([Path(p) for p in listed], registry)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CompiledHook:
    hook: SiteHook
    strategy: str
    plugin: str


class _Compiler:
    """The :class:`~meminject.extension.CompileContext` handed to strategies."""

    def __init__(
        self,
        model: LoadedModel,
        registry: Registry,
        entries: list[MemoryEntry],
        allow_outside_paths: bool = False,
    ):
        self.model = model
        self.registry = registry
        self.allow_outside_paths = allow_outside_paths
        self._entries = {id(e.memory): e for e in entries}

    def entry(self, memory: Any) -> MemoryEntry:
        return self._entries[id(memory)]

    def error(self, memory: Any, message: str, field: str | None = None) -> Exception:
        return self.entry(memory).error(message, field)

    def encode(self, memory: Any) -> torch.Tensor:
        params = memory.encoder_params()
        key = (
            memory.encoding,
            memory.model_dump_json(exclude=_CACHE_EXCLUDE),
            params.model_dump_json() if params is not None else None,
        )
        cached = self.model.encodings.get(key)
        if cached is not None:
            return cached
        vector = run_encoder(
            self.model,
            memory,
            self.registry,
            subject=f"memory '{memory.name}'",
            where=self.entry(memory).location().render(),
            bad_input=lambda exc: self.error(memory, str(exc), "text"),
        )
        self.model.encodings[key] = vector
        return vector


def run_encoder(
    model: LoadedModel,
    memory: Any,
    registry: Registry,
    *,
    subject: str,
    where: str,
    bad_input: Callable[[MeminjectError], Exception] | None = None,
) -> torch.Tensor:
    """``memory``'s vector from its registered encoder, the one way meminject encodes
    (memory files and the sweep's texts alike): an encoder's crash is its plugin's error
    (naming ``subject``), a vector that breaks the contract too (naming ``where``), and
    an input it refuses goes through ``bad_input`` (to name the memory file's field)."""
    entry = registry.encoders[memory.encoding]
    request = EncodeRequest(model, memory, memory.encoder_params())
    try:
        vector = entry.encoder(request)
    except MeminjectError as exc:
        if bad_input is None:
            raise
        raise bad_input(exc) from exc
    except Exception as exc:
        raise PluginError(
            entry.plugin, f"encoder '{entry.name}' failed on {subject}: {exc!r}"
        ) from exc
    return checked_encoding(vector, model, entry, where)


def checked_encoding(vector: Any, model: LoadedModel, entry: Any, where: str) -> torch.Tensor:
    """``vector`` if it keeps the encoder contract (a finite floating tensor of shape
    ``[d_model]``), else a :class:`PluginError` naming the encoder's plugin: a broken
    encoder is its author's mistake, not the memory file's."""
    import torch

    d_model = model.dims.d_model
    problem = None
    if not isinstance(vector, torch.Tensor):
        problem = f"returned a {type(vector).__name__}, not a torch.Tensor"
    elif tuple(vector.shape) != (d_model,):
        problem = f"returned shape {tuple(vector.shape)}"
    elif not vector.is_floating_point():
        problem = f"returned dtype {dtype_name(vector.dtype)}, not a float"
    elif not bool(vector.isfinite().all()):
        problem = "returned non-finite values"
    if problem is not None:
        raise PluginError(
            entry.plugin,
            f"encoder '{entry.name}' {problem} for {where}; an encoder must return a "
            f"finite float tensor of shape ({d_model},), the model's d_model",
        )
    # Vectors are kept in float32 whatever the model's dtype; strategies scale them by τ
    # there and cast the result once, to the model's dtype, where it is added.
    return vector.detach().float()


def check_coordinates_of(memory_set: MemorySet, model: LoadedModel) -> None:
    """Refuse a set whose ``[model] coordinates`` the model was not loaded in, unless the
    caller chose the model's coordinates: on the command line the table would have
    chosen them, so running the set in others silently would make the same file behave
    differently from Python. ``load_model(..., memories=set)`` applies the table."""
    info = memory_set.model_info()
    if info is None or info.coordinates is None or info.coordinates == model.coordinates:
        return
    if model.coordinates_asked:
        return
    path = next(f.path for f in memory_set.files if f.model and f.model.coordinates)
    raise MemoryFileError(
        f"[model] coordinates = '{info.coordinates}', but model '{model.name}' is loaded in "
        f"'{model.coordinates}' coordinates; load it with load_model(..., memories=…) or "
        f"coordinates='{info.coordinates}'",
        Location(path, None, None, "model.coordinates"),
    )


def compile_memories(
    model: LoadedModel,
    memories: MemoriesLike,
    registry: Registry | None = None,
    *,
    allow_outside_paths: bool = False,
) -> list[CompiledHook]:
    """Check the set against the model and turn its active memories into hooks.

    ``allow_outside_paths`` lets tensor files live outside their memory file's
    directory (absolute paths, ``..``, symlinks); off by default for untrusted sets.
    """
    registry = registry or get_registry()
    memory_set = as_memory_set(memories, registry)
    check_against_model(memory_set, model.dims)
    check_coordinates_of(memory_set, model)
    compiler = _Compiler(model, registry, memory_set.entries, allow_outside_paths)
    by_strategy: dict[str, list[Any]] = defaultdict(list)
    for entry in memory_set.entries:
        by_strategy[entry.memory.strategy].append(entry.memory)
    compiled: list[CompiledHook] = []
    for name, memories_of_kind in by_strategy.items():
        reg = registry.strategies[name]
        strategy = reg.strategy_cls()
        active = [m for m in memories_of_kind if not strategy.is_noop(m)]
        if not active:
            continue
        try:
            hooks = strategy.compile(active, compiler)
        except MeminjectError:
            raise
        except Exception as exc:
            raise PluginError(reg.plugin, f"strategy '{name}' failed to compile: {exc!r}") from exc
        compiled.extend(CompiledHook(h, name, reg.plugin) for h in hooks)
    return compiled


def added_scales(
    model: LoadedModel, memories: MemoriesLike, registry: Registry | None = None
) -> dict[str, float]:
    """For each ``add`` memory of the set, the largest |component| of the vector its τ
    multiplies (in τ·N·v/‖v‖ units when ``tau_units = "resid_norm"``), by name.

    Why: a server must refuse a τ override whose τ·v is not finite before the request
    joins a batch, and without running an encoder (which may run the model, on the
    worker thread only). The vectors were encoded when the set was compiled at start,
    so this reads the cache."""
    registry = registry or get_registry()
    memory_set = as_memory_set(memories, registry)
    compiler = _Compiler(model, registry, memory_set.entries)
    scales: dict[str, float] = {}
    for entry in memory_set.entries:
        memory = entry.memory
        if memory.strategy != "add":
            continue
        vector = compiler.encode(memory)
        largest = float(vector.abs().max())
        if memory.tau_units == "resid_norm":
            norm = float(vector.float().norm())
            largest = largest * memory.resid_norm / norm if norm else 0.0
        scales[entry.name] = largest
    return scales


def chain_parts(hook_name: str, parts: list[CompiledHook], ctx: InjectionContext) -> Any:
    """One function running every compiled body of a hook point in turn, naming the
    strategy and plugin when a body fails. Bridge hooks pass ``hook``; the plain-model
    fast path calls it with the activation alone."""

    def run(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
        for part in parts:
            try:
                activation = part.hook.body(activation, ctx)
            except MeminjectError:
                raise
            except Exception as exc:
                raise InjectionError(
                    f"strategy '{part.strategy}' (plugin '{part.plugin}') failed at "
                    f"{hook_name}: {exc!r}"
                ) from exc
        return activation

    return run


#: What ``inject`` and ``generate`` accept: a set, paths, or hooks compiled beforehand.
MemoriesArg: TypeAlias = MemoriesLike | list[CompiledHook]


def as_compiled(
    model: LoadedModel, memories: MemoriesArg | None, registry: Registry | None = None
) -> list[CompiledHook]:
    """Hooks for ``memories``: compiled now, or as given when compiled beforehand."""
    if memories is None:
        return []
    if isinstance(memories, list) and all(isinstance(m, CompiledHook) for m in memories):
        return list(memories)
    return compile_memories(model, memories, registry)  # type: ignore[arg-type]


def chained_bodies(
    grouped: Mapping[str, list[CompiledHook]], ctx: InjectionContext
) -> dict[str, Any]:
    """Each hook point's chain of compiled bodies, as one function of the activation."""
    return {name: chain_parts(name, parts, ctx) for name, parts in grouped.items()}


def group_by_hook(compiled: list[CompiledHook]) -> dict[str, list[CompiledHook]]:
    """Compiled hooks by hook point, in compile order (one installed function each)."""
    grouped: dict[str, list[CompiledHook]] = defaultdict(list)
    for part in compiled:
        grouped[part.hook.hook_name].append(part)
    return dict(grouped)


@contextmanager
def inject(
    model: LoadedModel,
    memories: MemoriesArg | None,
    *,
    context: InjectionContext | None = None,
    registry: Registry | None = None,
) -> Iterator[InjectionContext]:
    """Activate a memory set on ``model`` for the duration of the block.

    >>> with inject(model, "memories/toyworld/") as ctx:   # doctest: +SKIP
    ...     logits = model.bridge(model.to_tokens("The capital of Velor is"))

    The yielded :class:`InjectionContext` tells hooks where the current forward
    sits in the sequence; code that runs its own KV-cached loop updates
    ``ctx.offset`` (``generate`` does this for you).
    """
    ctx = context or InjectionContext()
    grouped = group_by_hook(as_compiled(model, memories, registry))
    backend = BridgeBackend(model)
    for name in grouped:
        reason = backend.unsupported(name)
        if reason is not None:
            raise BadInputError(reason)
    with backend.hooks(chained_bodies(grouped, ctx)):
        yield ctx
