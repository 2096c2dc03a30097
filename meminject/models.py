"""Loading models through TransformerLens 4 (``TransformerBridge``), and the loaded handle.

Coordinates matter (DESIGN §4): by default the bridge is put in compatibility
mode, which folds LayerNorm and centres weights as the paper's
``HookedTransformer`` did, so ``W_U``-based encodings match the paper's numbers.
``coordinates="raw"`` keeps the checkpoint's own weights.

Importing this module is cheap; torch and transformer_lens load on first use.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject import gguf_cache
from meminject.errors import BadInputError, ModelLoadError
from meminject.memfile import ModelDims

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float, Int
    from torch import Tensor
    from transformer_lens.model_bridge import TransformerBridge

    from meminject.snapshots import Served

DTYPES = ("float32", "float16", "bfloat16")
COORDINATES = ("processed", "raw")


@dataclass(frozen=True)
class ModelFacts:
    """What meminject reads from a model's configuration, kept apart from the bridge so
    that a model loaded from a served snapshot (:mod:`meminject.snapshots`) answers
    without TransformerLens."""

    dims: ModelDims
    d_head: int
    d_mlp: int | None
    parallel_attn_mlp: bool
    #: Gemma 2/3: each block normalises its attention and MLP outputs before adding them.
    post_sublayer_norms: bool

    @classmethod
    def of_bridge(cls, bridge: Any) -> ModelFacts:
        cfg = bridge.cfg
        mapping = getattr(bridge.adapter, "component_mapping", None) or {}
        blocks = mapping.get("blocks") if hasattr(mapping, "get") else None
        subs = getattr(blocks, "submodules", None) or {}
        dims = ModelDims(
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            d_model=int(cfg.d_model),
            d_vocab=int(cfg.d_vocab),
            n_ctx=int(cfg.n_ctx),
        )
        return cls(
            dims=dims,
            d_head=int(cfg.d_head or dims.d_model // dims.n_heads),
            d_mlp=int(cfg.d_mlp) if cfg.d_mlp else None,
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
            post_sublayer_norms="ln1_post" in subs or "ln2_post" in subs,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: getattr(self.dims, k) for k in ("n_layers", "n_heads", "d_model", "d_vocab")},
            "n_ctx": self.dims.n_ctx,
            "d_head": self.d_head,
            "d_mlp": self.d_mlp,
            "parallel_attn_mlp": self.parallel_attn_mlp,
            "post_sublayer_norms": self.post_sublayer_norms,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelFacts:
        dims = ModelDims(**{k: int(data[k]) for k in ModelDims.__dataclass_fields__})
        d_mlp = data.get("d_mlp")
        return cls(
            dims=dims,
            d_head=int(data["d_head"]),
            d_mlp=int(d_mlp) if d_mlp else None,
            parallel_attn_mlp=bool(data["parallel_attn_mlp"]),
            post_sublayer_norms=bool(data["post_sublayer_norms"]),
        )


@dataclass(frozen=True)
class BridgeRecipe:
    """How to boot the bridge later, for a model loaded without it."""

    source: str
    device: str
    dtype: str


class LoadedModel:
    """A model as meminject runs it: the bridge (TransformerBridge) for analysis and
    per-head work, plus its name, coordinates and the per-(memory, model) encoding cache
    (encodings are computed once, never in a hook).

    A model loaded from a served snapshot (``load_model(..., light=True)``) starts with
    only the plain Hugging Face model that generation runs on; the bridge is booted the
    first time something asks for it (an analysis, a per-head memory, a plugin)."""

    def __init__(
        self,
        bridge: TransformerBridge | None,
        name: str,
        coordinates: str,
        source: str,
        *,
        prepend_bos: bool = True,
        origin: str | None = None,
        facts: ModelFacts | None = None,
        served: Served | None = None,
        fingerprint: str | None = None,
        bridge_recipe: BridgeRecipe | None = None,
    ):
        if bridge is None and (served is None or facts is None):
            raise ValueError("a LoadedModel needs a bridge, or a served model and its facts")
        self._bridge = bridge
        self.name = name
        self.coordinates = coordinates
        self.source = source
        #: Whether prompts get the BOS token first (see :func:`load_model` for the default).
        self.prepend_bos = prepend_bos
        #: What the user named, when the weights came from elsewhere (a GGUF file).
        self.origin = origin
        self.facts = facts if facts is not None else ModelFacts.of_bridge(bridge)
        #: The served snapshot this model was loaded from (:mod:`meminject.snapshots`).
        self.served = served
        self.encodings: dict[Any, torch.Tensor] = {}
        #: Backends built for this model (:mod:`meminject.backends`), by name, or the
        #: reason one could not be built; filled on first use.
        self.backends: dict[str, Any] = {}
        self._fingerprint = fingerprint
        self.bridge_recipe = bridge_recipe
        #: What ``prepend_bos=None`` resolved to at load (a snapshot records it).
        self.prepend_bos_default = prepend_bos

    def __repr__(self) -> str:
        how = "bridge" if self._bridge is not None else "served snapshot"
        return f"LoadedModel(name={self.name!r}, coordinates={self.coordinates!r}, {how})"

    def _served(self) -> Served:
        assert self.served is not None  # a model without a bridge has a served one
        return self.served

    @property
    def bridge(self) -> TransformerBridge:
        """The TransformerBridge; booted on first use for a model loaded light."""
        if self._bridge is None:
            self._bridge = self._boot_bridge()
        return self._bridge

    @property
    def has_bridge(self) -> bool:
        return self._bridge is not None

    def _boot_bridge(self) -> TransformerBridge:
        recipe = self.bridge_recipe
        if recipe is None:
            raise ModelLoadError(f"model '{self.name}' has no source to boot TransformerLens from")
        _quiet_libraries()
        bridge = _boot(recipe.source, recipe.device, resolve_dtype(recipe.dtype))
        if self.coordinates == "processed":
            bridge.enable_compatibility_mode(disable_warnings=True)
            _return_freed_memory()
        bridge.eval()
        bridge.cfg.default_prepend_bos = self.prepend_bos
        return bridge

    def fingerprint(self) -> str:
        """A hash of the weights as loaded (coordinates included), so a key/delta memory
        made on one model is refused on another. Computed once, on first use (a served
        snapshot carries the one its bridge had)."""
        if self._fingerprint is None:
            import hashlib

            import torch

            digest = hashlib.blake2b(digest_size=16)
            digest.update(self.coordinates.encode())
            state = self.bridge.original_model.state_dict()
            for name in sorted(state):
                tensor = state[name].detach()
                digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = f"blake2b:{digest.hexdigest()}"
        return self._fingerprint

    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def device(self) -> torch.device:
        import torch

        if self._bridge is None:
            return torch.device(self._served().device)
        return torch.device(self._bridge.cfg.device or "cpu")

    @property
    def dtype(self) -> torch.dtype:
        if self._bridge is None:
            return self._served().dtype
        return next(self._bridge.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        if self._bridge is None:
            return self._served().tokenizer
        return self._bridge.tokenizer

    @property
    def dims(self) -> ModelDims:
        return self.facts.dims

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding, in this model's coordinates."""
        if self._bridge is None:
            return self._served().hf.get_output_embeddings().weight.T
        return self._bridge.W_U

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding, in this model's coordinates."""
        if self._bridge is None:
            return self._served().hf.get_input_embeddings().weight
        return self._bridge.W_E

    def site_shape(self, site: str) -> tuple[int, ...]:
        """Shape of one position's activation at a site (what keys and deltas must have)."""
        from meminject.sites import site_shape

        return site_shape(self, site)

    def model_table(self) -> dict[str, Any]:
        """The ``[model]`` table describing this model, fingerprint included."""
        dims = self.dims
        return {
            "name": self.name,
            "d_model": dims.d_model,
            "n_layers": dims.n_layers,
            "n_heads": dims.n_heads,
            "d_vocab": dims.d_vocab,
            "coordinates": self.coordinates,
            "prepend_bos": self.prepend_bos,
            "fingerprint": self.fingerprint(),
        }

    @property
    def prepends_bos(self) -> bool:
        return self.prepend_bos

    @property
    def post_sublayer_norms(self) -> bool:
        """Whether each block normalises its attention and MLP outputs before adding them
        to the residual stream (Gemma 2/3). Then ``attn_out``/``mlp_out`` are those
        normalised contributions, and one head's result is no longer a summand of
        ``attn_out`` but of the attention's output before its norm (``attn.hook_out``)."""
        return self.facts.post_sublayer_norms

    def tokenize(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS follows the model's default unless told."""
        bos = self.prepends_bos if prepend_bos is None else prepend_bos
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        if bos:
            bos_id = self.tokenizer.bos_token_id
            if bos_id is None:
                raise BadInputError(f"model '{self.name}' has no BOS token to prepend")
            ids = [int(bos_id), *ids]
        return [int(t) for t in ids]

    def to_tokens(self, text: str) -> Int[Tensor, "1 pos"]:
        import torch

        ids = self.check_prompt_ids(self.tokenize(text))
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def check_prompt_ids(self, ids: list[int]) -> list[int]:
        """``ids`` if they can be a prompt: not empty, and within the model's context."""
        if not ids:
            raise BadInputError("the prompt is empty and the model prepends no BOS token")
        if len(ids) > self.dims.n_ctx:
            raise BadInputError(
                f"the prompt is {len(ids)} tokens, longer than the model's context of "
                f"{self.dims.n_ctx}"
            )
        return ids

    def decode(self, ids: Any) -> str:
        return str(self.tokenizer.decode([int(t) for t in ids]))

    def token_str(self, token_id: int) -> str:
        return self.decode([token_id])


def _quiet_libraries() -> None:
    """Third-party chatter (progress bars, compatibility warnings, hub retries) is not
    meminject's output; the CLI promises one clear line per problem."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module=r"transformer_lens(\.|$)")
    warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
    for name in ("transformers", "huggingface_hub", "transformer_lens", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _return_freed_memory() -> None:
    """Hand the heap that weight processing freed back to the operating system.

    TransformerLens folds and centres the weights through float32 copies of the whole
    state dict; once they are freed, glibc keeps the pages, so the process stays about
    400 MiB larger than its tensors on SmolLM2-135M (1,559 → 1,139 MiB resident,
    measured). Elsewhere (no glibc) this does nothing."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BadInputError(
            f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto"
        ) from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device '{device}' was asked for, but CUDA is not available")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise BadInputError(
            f"device '{device}' was asked for, but only {torch.cuda.device_count()} "
            "CUDA devices exist"
        )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise BadInputError(f"device '{device}' was asked for, but MPS is not available")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise BadInputError(f"device '{device}' is not supported; use cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(dtype: str | None) -> torch.dtype:
    import torch

    name = dtype or "float32"
    if name not in DTYPES:
        raise BadInputError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    dtype_obj: torch.dtype = getattr(torch, name)
    return dtype_obj


def _official_name(name: str) -> str:
    from transformer_lens.supported_models import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        return name


def load_model(
    name_or_path: str | os.PathLike[str] = "toyworld",
    *,
    device: str | None = None,
    dtype: str | None = None,
    coordinates: str = "processed",
    prepend_bos: bool | None = None,
    allow_pickle_weights: bool = False,
    registry: Any | None = None,
    light: bool = False,
) -> LoadedModel:
    """Load a registered model (``toyworld``, ``smollm2-135m``), a local Hugging Face
    directory, a GGUF file (dequantized once into the cache, see
    :mod:`meminject.gguf_cache`), or a hub name/alias (``gpt2-small``) through
    ``TransformerBridge.boot_transformers``.

    ``prepend_bos``: None takes the registered source's convention, else for a GGUF
    file its tokenizer's, else TransformerLens's default (prepend, as the paper did).
    ``allow_pickle_weights``: a directory whose weights are only pickles
    (``pytorch_model.bin``) is refused unless this is set (meminject reads no pickle).
    ``light``: load from this model's served snapshot when one is cached (the weights
    generation computes with, written by an earlier run; :mod:`meminject.snapshots`):
    no TransformerLens import and one copy of the weights. The bridge boots on first use.
    """
    from meminject.plugins import get_registry

    if coordinates not in COORDINATES:
        raise BadInputError(f"unknown coordinates '{coordinates}'; choose processed or raw")
    registry = registry or get_registry()
    name = str(name_or_path)
    target: Any = name
    bos_default: bool | None = None
    if name in registry.models:
        entry = registry.models[name]
        target = entry.loader(device=device, dtype=dtype)
        bos_default = entry.prepend_bos
    source = None
    origin = None
    if isinstance(target, (str, os.PathLike)) and gguf_cache.is_gguf_path(target):
        origin = str(target)
        # Checked here too so a bad path fails before _quiet_libraries imports transformers.
        gguf_cache.check_gguf_file(Path(target).expanduser())
        _quiet_libraries()
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

    _quiet_libraries()
    device_name = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    dtype_name = dtype or "float32"
    if light and source is not None:
        from meminject import snapshots

        served = snapshots.load_if_cached(
            Path(source),
            name=name,
            device=device_name,
            dtype=dtype_name,
            coordinates=coordinates,
            prepend_bos=prepend_bos,
            origin=origin,
            recipe=BridgeRecipe(source, device_name, dtype_name),
        )
        if served is not None:
            return served
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(target, TransformerBridge):
        bridge = target
        source = name
        recipe = None
    else:
        source = source or _official_name(str(target))
        bridge = _boot(source, device_name, torch_dtype)
        recipe = BridgeRecipe(source, device_name, dtype_name)
    if coordinates == "processed":
        bridge.enable_compatibility_mode(disable_warnings=True)
        _return_freed_memory()
    bridge.eval()
    default_bos = bos_default
    if default_bos is None and origin is not None:
        default_bos = _tokenizer_adds_bos(bridge.tokenizer)
    if default_bos is None:
        default_bos = bool(getattr(bridge.cfg, "default_prepend_bos", True))
    bridge.cfg.default_prepend_bos = default_bos if prepend_bos is None else prepend_bos
    loaded = LoadedModel(
        bridge=bridge,
        name=name,
        coordinates=coordinates,
        source=source,
        prepend_bos=bridge.cfg.default_prepend_bos,
        origin=origin,
        bridge_recipe=recipe,
    )
    loaded.prepend_bos_default = default_bos
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


def _check_hub_name(name: str, registry: Any) -> None:
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


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    """What plain ``transformers`` does with this tokenizer: BOS first or not."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def _boot(source: str, device: str, dtype: torch.dtype) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(source, device=device, dtype=dtype)
    except OSError as exc:
        if Path(source).is_dir():
            raise ModelLoadError(f"could not load the model in {source}: {exc}") from exc
        raise ModelLoadError(
            f"could not download {source!r}; pass a local path or use toyworld"
        ) from exc
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(f"could not load {source!r}: {exc}") from exc
