"""Loading: a model name, directory or GGUF file → a :class:`LoadedModel`, and memory
files → a :class:`MemorySet` with the registered plugins.

These are the public entry points that resolve defaults — the plugin registry, the
memory files' ``[model]`` table — so the layers below take them as arguments.

Importing this module is cheap; torch and transformer_lens load on first use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject import gguf_cache, progress
from meminject.bridge_boot import (
    boot_bridge,
    official_name,
    prepare_bridge,
    quiet_libraries,
    resolve_device,
    tokenizer_adds_bos,
)
from meminject.errors import ModelLoadError
from meminject.memfile import MemorySet, load_memory_set
from meminject.model_handle import BosRule, BridgeRecipe, LoadedModel, check_coordinates
from meminject.plugins import Registry, get_registry

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def load_memories(
    paths: Sequence[Path | str] | Path | str, registry: Registry | None = None
) -> MemorySet:
    """Memory files and directories (``*.toml`` inside, recursively) as one set, validated
    against the registered plugins (``registry``: the default one when None)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return load_memory_set(list(paths), registry or get_registry())


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    memories: MemorySet | None = None,
    device: str | None = None,
    dtype: str | None = None,
    coordinates: str | None = None,
    prepend_bos: bool | None = None,
    allow_pickle_weights: bool = False,
    registry: Registry | None = None,
    bridge: bool = False,
) -> LoadedModel:
    """Load a registered model (``toyworld``, ``smollm2-135m``), a local Hugging Face
    directory, a GGUF file (dequantized once into the cache, see
    :mod:`meminject.gguf_cache`), or a hub name/alias (``gpt2-small``) through
    ``TransformerBridge.boot_transformers``.

    ``memories``: the set the model will run with; its ``[model]`` table gives the
    defaults, exactly as on the command line: the model (``name``, when
    ``name_or_path`` is None; toyworld when neither names one), ``coordinates`` and
    ``prepend_bos``. An argument given here wins over the table.
    ``coordinates``: processed (the default) or raw.
    ``prepend_bos``: see :class:`~meminject.model_handle.BosRule` for the rule.
    ``allow_pickle_weights``: a directory whose weights are only pickles
    (``pytorch_model.bin``) is refused unless this is set (meminject reads no pickle).
    The model holds one copy of the weights and no TransformerLens: a local checkpoint
    of a family :mod:`meminject.processing` knows loads straight into a plain Hugging
    Face model (:mod:`meminject.plain_loading`); another architecture loads from its
    served snapshot when one is cached (:mod:`meminject.snapshots`). The bridge boots
    the first time something asks for it (``model.bridge``: an analysis, per-head
    results). ``bridge``: boot TransformerBridge at load instead, for work that needs it
    throughout (``inspect``, ``learn``, sweeps); also what other models get.
    """
    info = memories.model_info() if memories is not None else None
    if name_or_path is None:
        name_or_path = (info.name if info is not None else None) or "toyworld"
    coordinates_asked = coordinates is not None
    if coordinates is None:
        coordinates = (info.coordinates if info is not None else None) or "processed"
    check_coordinates(coordinates)
    files_bos = info.prepend_bos if info is not None else None
    registry = registry or get_registry()
    name = str(name_or_path)
    target: Any = name
    convention: bool | None = None
    if name in registry.models:
        entry = registry.models[name]
        target = entry.loader(device=device, dtype=dtype)
        convention = entry.prepend_bos
    source = None
    origin = None
    if isinstance(target, (str, os.PathLike)) and gguf_cache.is_gguf_path(target):
        origin = str(target)
        # Checked here too so a bad path fails before quiet_libraries imports transformers.
        gguf_cache.check_gguf_file(Path(target).expanduser())
        quiet_libraries()
        target = gguf_cache.dequantized_dir(target)
    if isinstance(target, (str, os.PathLike)):
        # Local paths are checked before torch and transformer_lens load (seconds).
        path = Path(target).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"{target} is not a Hugging Face model directory (no config.json)"
                )
            check_weights_format(path, allow_pickle_weights)
            source = str(path)
        elif path.is_absolute() or str(target).startswith((".", "~")) or path.exists():
            raise ModelLoadError(f"no model directory at {target}")
        elif name not in registry.models:
            _check_hub_name(name, registry)

    quiet_libraries()
    device_name = resolve_device(device)
    dtype_name = dtype or "float32"
    bos = BosRule(asked=prepend_bos, files=files_bos, convention=convention)
    if not bridge and source is not None:
        from meminject import plain_loading, snapshots

        how: dict[str, Any] = dict(
            name=name,
            device=device_name,
            dtype=dtype_name,
            coordinates=coordinates,
            origin=origin,
            recipe=BridgeRecipe(source, device_name, dtype_name),
        )
        light = snapshots.load_if_cached(Path(source), bos=bos, **how)
        family = plain_loading.supported(Path(source)) if light is None else None
        if family is not None:
            if convention is None and origin is not None:
                from transformers import AutoTokenizer

                convention = tokenizer_adds_bos(AutoTokenizer.from_pretrained(source))
                bos = BosRule(prepend_bos, files_bos, convention)
            with progress.step(f"loading {name} ({coordinates} coordinates)"):
                light = plain_loading.load_plain(Path(source), family, bos=bos, **how)
        if light is not None:
            light.coordinates_asked = coordinates_asked
            return light
    from transformer_lens.model_bridge import TransformerBridge

    booted: TransformerBridge
    if isinstance(target, TransformerBridge):  # a plugin's loader built it
        booted = prepare_bridge(target, coordinates)
        source = name
        recipe = None
    else:
        source = source or official_name(str(target))
        with progress.step(f"loading {name} through TransformerLens ({coordinates} coordinates)"):
            booted = boot_bridge(source, device_name, dtype_name, coordinates)
        recipe = BridgeRecipe(source, device_name, dtype_name)
    if convention is None and origin is not None:
        bos = BosRule(prepend_bos, files_bos, tokenizer_adds_bos(booted.tokenizer))
    loaded = LoadedModel(
        bridge=booted,
        name=name,
        coordinates=coordinates,
        source=source,
        bos=bos,
        coordinates_asked=coordinates_asked,
        origin=origin,
        bridge_recipe=recipe,
    )
    import torch  # loaded with the bridge

    loaded.load_threads = torch.get_num_threads()
    return loaded


#: Weight files that are Python pickles (torch.save); safetensors are not.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weights_format(path: Path, allow_pickle_weights: bool) -> None:
    """Refuse a model directory whose weights are pickles: loading one runs
    ``torch.load``, which meminject promises never to do unless asked."""
    if allow_pickle_weights or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise ModelLoadError(
            f"{path / pickles[0]} is a pickle (torch.save) file and {path} has no safetensors "
            "weights; meminject loads no pickle unless you pass --allow-pickle-weights"
        )


def _check_hub_name(name: str, registry: Registry) -> None:
    """A name that is neither registered nor a path goes to the hub: first catch typos of
    registered names, and fail fast, with the way to work offline, when the hub cannot be
    reached (the hub client otherwise retries for half a minute)."""
    import difflib

    close = difflib.get_close_matches(name, list(registry.models), n=1, cutoff=0.7)
    if close:
        raise ModelLoadError(
            f"no model named {name!r}; did you mean {close[0]!r}? (see meminject models)"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return  # the hub client answers at once from its cache, or fails at once
    if not _hub_reachable():
        raise ModelLoadError(
            f"could not download {name!r}: the Hugging Face hub is unreachable. Pass a local "
            "model directory or GGUF file, use a registered model (meminject models), or set "
            "HF_HUB_OFFLINE=1 to use models already in the Hugging Face cache"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
