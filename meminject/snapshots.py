"""Served snapshots: the weights generation computes with, cached so that a later
process loads them alone, with no TransformerLens import and one copy of the weights.

Why: the ``hf`` backend computes with the bridge's own tensors, which TransformerLens
has folded and centred (processed coordinates). Getting them means importing
TransformerLens (about 4.5 s) and processing the checkpoint through float32 copies of
the whole state dict (a peak of about 2.6 times the weights on SmolLM2-135M). Both are
paid again by every ``meminject generate`` process, for the same numbers. A snapshot
stores those tensors once, as the plain model holds them, with everything else the
backend measured against the bridge, so the next process is a plain ``transformers``
load.

A snapshot is a directory ``<root>/<key>/`` (root: ``$MEMINJECT_SNAPSHOTS``, else
``served/`` in the model cache; ``MEMINJECT_SNAPSHOTS=off`` disables them):

* ``weights.safetensors``: every parameter and buffer of the plain model, each stored
  once (a tensor two modules share is stored under its first name), plus the measured
  ``attn_z`` offsets and the probe's next-token log-probabilities;
* ``config.json`` and the bridge's tokenizer files;
* ``meminject-served.json``, written last (its presence means the directory is whole):
  the fingerprint of the weights as the bridge loaded them, the model's facts, where
  the plain model keeps each block's modules, which names are parameters or buffers,
  and the site maps, failures included, so ``unsupported`` answers as the bridge did.

The key hashes the source directory's files (name, size, modification time), the dtype,
the coordinates, and the versions of meminject, TransformerLens, transformers and torch:
a change to any of them makes a new snapshot, so a stale one is never read. On load the
probe is run again and its log-probabilities must match the recorded ones, else the
snapshot is passed over and the model boots through the bridge as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject import gguf_cache
from meminject.atomic import publish_dir

if TYPE_CHECKING:
    import torch

    from meminject.backends.hf import HFBackend
    from meminject.model_handle import BosRule, BridgeRecipe, LoadedModel

SNAPSHOTS_ENV = "MEMINJECT_SNAPSHOTS"
#: 2: the BOS convention recorded as the source's; 3: checkpoint fingerprints.
FORMAT = 3
MARKER = "meminject-served.json"
WEIGHTS = "weights.safetensors"
_PROBE = "meminject/probe_log_probs"
_OFFSET = "meminject/offset/"
_VERSIONED = ("meminject", "transformer-lens", "transformers", "torch")

log = logging.getLogger("meminject")


def snapshots_root() -> Path | None:
    """Where snapshots live, or None when ``MEMINJECT_SNAPSHOTS=off``."""
    configured = os.environ.get(SNAPSHOTS_ENV, "").strip()
    if configured.lower() in ("off", "0", "no", "false"):
        return None
    if configured:
        return Path(configured).expanduser()
    return gguf_cache.cache_root() / "served"


def snapshot_key(source_dir: Path, dtype: str, coordinates: str) -> str:
    """The directory name for ``source_dir`` loaded in ``dtype`` and ``coordinates``."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"format={FORMAT}|{source_dir.resolve()}|{dtype}|{coordinates}".encode())
    for package in _VERSIONED:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"|{package}={version}".encode())
    for path in sorted(source_dir.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def snapshot_dir(source_dir: Path, dtype: str, coordinates: str) -> Path | None:
    """Where the snapshot of this load is or would be (None when disabled)."""
    root = snapshots_root()
    if root is None:
        return None
    return root / snapshot_key(source_dir, dtype, coordinates)


# -- writing ------------------------------------------------------------------------


def write(model: LoadedModel) -> Path | None:
    """Write the served snapshot of ``model`` (loaded through the bridge from a local
    directory) if it has none yet; the snapshot's directory, or None when there is
    nothing to write: snapshots disabled, no local source, or no ``hf`` backend."""
    from meminject.backends import BackendUnavailable, get_backend
    from meminject.backends.hf import HFBackend

    recipe = model.bridge_recipe
    if not model.has_bridge or model.served is not None or recipe is None:
        return None
    source = Path(recipe.source)
    if not source.is_dir():
        return None
    target = snapshot_dir(source, recipe.dtype, model.coordinates)
    if target is None or (target / MARKER).is_file():
        return target
    try:
        backend = get_backend(model, "hf")
    except BackendUnavailable:
        return None
    assert isinstance(backend, HFBackend)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".writing-", dir=target.parent))
    except OSError as exc:
        log.warning("meminject: no served snapshot written (%s)", exc)
        return None
    from meminject import progress

    try:
        with progress.step(f"storing {model.name}'s served snapshot for later runs"):
            _write_into(work, model, backend)
            publish_dir(work, target, lambda d: (d / MARKER).is_file())
        progress.note(
            f"stored {model.name}'s served snapshot in {target} "
            f"({progress.human_size(progress.size_of(target))}); later runs load from it"
        )
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        log.warning("meminject: no served snapshot written (%s)", exc)
        return None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _every_served_hook(model: LoadedModel) -> list[str]:
    from meminject.sites import PLAIN_SITES, TABLE, hook_name

    sites = [name for name in TABLE if name in PLAIN_SITES]
    return [hook_name(site, layer) for site in sites for layer in range(model.dims.n_layers)]


def _write_into(work: Path, model: LoadedModel, backend: HFBackend) -> None:
    from safetensors.torch import save_file

    maps = backend.measure(_every_served_hook(model))
    layout: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    first_name: dict[int, str] = {}
    pointers: set[int] = set()
    for module_name, module in backend.hf.named_modules(remove_duplicate=False):
        for kind, table in (("parameter", module._parameters), ("buffer", module._buffers)):
            for key, tensor in table.items():
                if tensor is None:
                    continue
                name = f"{module_name}.{key}" if module_name else key
                entry: dict[str, Any] = {"kind": kind}
                if kind == "buffer" and key in module._non_persistent_buffers_set:
                    entry["persistent"] = False
                stored = first_name.get(id(tensor))
                if stored is None:
                    first_name[id(tensor)] = stored = name
                    value = tensor.detach().contiguous()
                    if value.data_ptr() in pointers:  # another tensor's view: its own copy
                        value = value.clone()
                    pointers.add(value.data_ptr())
                    tensors[name] = value.cpu()
                entry["stored"] = stored
                layout[name] = entry
    site_maps: dict[str, Any] = {}
    for name, site_map in maps.items():
        if isinstance(site_map, str):
            site_maps[name] = {"unsupported": site_map}
            continue
        site_maps[name] = {"kind": site_map.kind, "error": site_map.error}
        if site_map.offset is not None:
            tensors[_OFFSET + name] = site_map.offset.detach().cpu().contiguous()
    tensors[_PROBE] = _probe_log_probs(backend).cpu()
    save_file(tensors, str(work / WEIGHTS))
    backend.hf.config.to_json_file(str(work / "config.json"))
    model.tokenizer.save_pretrained(str(work))
    recipe = model.bridge_recipe
    assert recipe is not None
    marker = {
        "format": FORMAT,
        "source": recipe.source,
        "dtype": recipe.dtype,
        "coordinates": model.coordinates,
        "fingerprint": model.fingerprint(),
        "bos_convention": model.bos.convention,
        "facts": model.facts.to_json(),
        "block_paths": backend.paths.to_json(),
        "logits_error": backend.logits_error,
        "layout": layout,
        "site_maps": site_maps,
    }
    (work / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def _probe_log_probs(backend: HFBackend) -> torch.Tensor:
    import torch

    with torch.no_grad():
        logits = backend.hf(backend.probe(), use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1)


# -- loading ------------------------------------------------------------------------


def load_if_cached(
    source_dir: Path,
    *,
    name: str,
    device: str,
    dtype: str,
    coordinates: str,
    bos: BosRule,
    origin: str | None,
    recipe: BridgeRecipe,
) -> LoadedModel | None:
    """The model from its served snapshot, or None when there is none or it does not
    reproduce its recorded probe (the caller then loads through the bridge)."""
    directory = snapshot_dir(source_dir, dtype, coordinates)
    if directory is None or not (directory / MARKER).is_file():
        return None
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        if marker.get("format") != FORMAT:
            return None
        return _load(directory, marker, name, device, coordinates, bos, origin, recipe)
    except SnapshotRefused as exc:
        log.warning("meminject: served snapshot %s not used: %s", directory, exc)
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("meminject: served snapshot %s not used: %r", directory, exc)
        return None


class SnapshotRefused(Exception):
    """A snapshot that does not compute what it recorded."""


def _load(
    directory: Path,
    marker: dict[str, Any],
    name: str,
    device: str,
    coordinates: str,
    bos: BosRule,
    origin: str | None,
    recipe: BridgeRecipe,
) -> LoadedModel:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from meminject.backends.hf import BlockPaths, HFBackend, SiteMap, plain_on_meta
    from meminject.model_handle import LoadedModel, ModelFacts, Served

    tensors = load_file(str(directory / WEIGHTS), device=device)
    config = AutoConfig.from_pretrained(str(directory))
    dtype = tensors[next(iter(marker["layout"].values()))["stored"]].dtype
    plain = plain_on_meta(config, dtype)
    modules = dict(plain.named_modules(remove_duplicate=False))
    made: dict[str, Any] = {}  # stored name → the one object every sharer gets
    for full_name, entry in marker["layout"].items():
        module_name, _, key = full_name.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            raise SnapshotRefused(f"the plain model has no module '{module_name}'")
        stored = entry["stored"]
        if entry["kind"] == "parameter":
            value = made.setdefault(
                stored, torch.nn.Parameter(tensors[stored], requires_grad=False)
            )
            module._buffers.pop(key, None)
            module._parameters[key] = value
        else:
            value = made.setdefault(stored, tensors[stored])
            module._parameters.pop(key, None)
            module._buffers[key] = value
            if entry.get("persistent") is False:
                module._non_persistent_buffers_set.add(key)
    still_meta = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if still_meta:
        raise SnapshotRefused(f"it has no tensor for '{still_meta[0]}'")
    plain.eval()
    served = Served(
        hf=plain,
        tokenizer=AutoTokenizer.from_pretrained(str(directory)),
        device=device,
        dtype=dtype,
        directory=directory,
    )
    convention = marker["bos_convention"]
    loaded = LoadedModel(
        bridge=None,
        name=name,
        coordinates=coordinates,
        source=recipe.source,
        bos=dataclasses.replace(bos, convention=None if convention is None else bool(convention)),
        origin=origin,
        facts=ModelFacts.from_json(marker["facts"]),
        served=served,
        fingerprint=str(marker["fingerprint"]),
        bridge_recipe=recipe,
    )
    maps: dict[str, SiteMap | str] = {}
    for hook, recorded in marker["site_maps"].items():
        if "unsupported" in recorded:
            maps[hook] = str(recorded["unsupported"])
        else:
            offset = tensors.get(_OFFSET + hook)
            maps[hook] = SiteMap(str(recorded["kind"]), offset, float(recorded["error"]))
    backend = HFBackend(loaded, plain, BlockPaths.from_json(marker["block_paths"]), maps)
    backend.logits_error = marker.get("logits_error")
    recorded_probe = tensors[_PROBE].float()
    now = _probe_log_probs(backend)
    error = float((now - recorded_probe).abs().max()) if now.shape == recorded_probe.shape else 1e9
    if error > backend.tolerance(recorded_probe.exp()):
        raise SnapshotRefused(
            f"its probe's log-probabilities differ from the recorded ones by {error:.2e}"
        )
    loaded.backends["hf"] = backend
    return loaded
