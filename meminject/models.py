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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError, ModelLoadError
from meminject.hookspecs import hookimpl
from meminject.memfile import ModelDims

if TYPE_CHECKING:
    import torch
    from jaxtyping import Int
    from torch import Tensor
    from transformer_lens.model_bridge import TransformerBridge

DTYPES = ("float32", "float16", "bfloat16")
COORDINATES = ("processed", "raw")


@dataclass(eq=False)
class LoadedModel:
    """A bridge plus what meminject needs beside it: its name, coordinates and the
    per-(memory, model) encoding cache (encodings are computed once, never in a hook)."""

    bridge: TransformerBridge
    name: str
    coordinates: str
    source: str
    encodings: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    #: The plain-model fast path (:class:`meminject.fastpath.PlainModel`), loaded on first
    #: use, or the reason it is unavailable; see ``generate(backend=...)``.
    plain: Any = field(default=None, repr=False)

    def fingerprint(self) -> str:
        """A hash of the weights as loaded (coordinates included), so a key/delta memory
        made on one model is refused on another. Computed once, on first use."""
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

        return torch.device(self.bridge.cfg.device or "cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return self.bridge.tokenizer

    @property
    def dims(self) -> ModelDims:
        cfg = self.bridge.cfg
        return ModelDims(
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            d_model=int(cfg.d_model),
            d_vocab=int(cfg.d_vocab),
            n_ctx=int(cfg.n_ctx),
        )

    def site_shape(self, site: str) -> tuple[int, ...]:
        """Shape of one position's activation at a site (what keys and deltas must have)."""
        dims = self.dims
        if site == "attn_z":
            return (dims.n_heads, int(self.bridge.cfg.d_head or dims.d_model // dims.n_heads))
        if site == "mlp_post":
            if not self.bridge.cfg.d_mlp:
                raise BadInputError(f"model '{self.name}' does not report its MLP width (d_mlp)")
            return (int(self.bridge.cfg.d_mlp),)
        return (dims.d_model,)

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
            "fingerprint": self.fingerprint(),
        }

    @property
    def prepends_bos(self) -> bool:
        return bool(getattr(self.bridge.cfg, "default_prepend_bos", True))

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

        ids = self.tokenize(text)
        if not ids:
            raise BadInputError("the prompt is empty and the model prepends no BOS token")
        if len(ids) > self.dims.n_ctx:
            raise BadInputError(
                f"the prompt is {len(ids)} tokens, longer than the model's context of "
                f"{self.dims.n_ctx}"
            )
        return torch.tensor([ids], dtype=torch.long, device=self.device)

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


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device '{device}' was asked for, but CUDA is not available")
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
    registry: Any | None = None,
) -> LoadedModel:
    """Load a registered model (``toyworld``), a local Hugging Face directory, or a hub
    name/alias (``gpt2-small``) through ``TransformerBridge.boot_transformers``."""
    from meminject.plugins import get_registry

    if coordinates not in COORDINATES:
        raise BadInputError(f"unknown coordinates '{coordinates}'; choose processed or raw")
    registry = registry or get_registry()
    name = str(name_or_path)
    target: Any = name
    if name in registry.models:
        target = registry.models[name].loader(device=device, dtype=dtype)
    source = None
    if isinstance(target, (str, os.PathLike)):
        # Local paths are checked before torch and transformer_lens load (seconds).
        path = Path(target).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"{target} is not a Hugging Face model directory (no config.json)"
                )
            source = str(path)
        elif path.is_absolute() or str(target).startswith((".", "~")) or path.exists():
            raise ModelLoadError(f"no model directory at {target}")

    _quiet_libraries()
    device_name = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(target, TransformerBridge):
        bridge = target
        source = name
    else:
        source = source or _official_name(str(target))
        bridge = _boot(source, device_name, torch_dtype)
    if coordinates == "processed":
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    return LoadedModel(bridge=bridge, name=name, coordinates=coordinates, source=source)


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


def _toyworld_loader(device: str | None = None, dtype: str | None = None) -> Path:
    from meminject import toyworld

    weights = Path(toyworld.WEIGHTS_DIR)
    if not (weights / "model.safetensors").is_file():
        raise ModelLoadError(
            f"toyworld weights are missing from {weights}; run python -m meminject.toyworld.train"
        )
    return weights


@hookimpl
def register_models(register: Any) -> None:
    register(
        "toyworld",
        _toyworld_loader,
        "Embedded GPT-2-architecture model trained on a synthetic world (offline default).",
    )
