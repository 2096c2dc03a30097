"""Booting TransformerBridge: the one place meminject starts TransformerLens.

Everything here imports torch, transformers or transformer_lens inside its functions,
so the model handle (:mod:`meminject.model_handle`) can boot a bridge on first use and
the loader (:mod:`meminject.loading`) can boot one at load, both through
:func:`boot_bridge`, without either paying for the import up front.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.dtypes import resolve_dtype
from meminject.errors import BadInputError, ModelLoadError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def quiet_libraries() -> None:
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


def return_freed_memory() -> None:
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
    """The device to load on: ``auto`` (or None) picks CUDA when present; anything else
    is checked against what this machine has."""
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


def official_name(name: str) -> str:
    from transformer_lens.supported_models import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        return name


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """What plain ``transformers`` does with this tokenizer: BOS first or not."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def boot_bridge(source: str, device: str, dtype: str, coordinates: str) -> TransformerBridge:
    """A TransformerBridge of ``source`` in eval mode, processed (LayerNorm folded,
    weights centred) when ``coordinates`` says so: the one way meminject boots one."""
    from transformer_lens.model_bridge import TransformerBridge

    quiet_libraries()
    try:
        bridge = TransformerBridge.boot_transformers(
            source, device=device, dtype=resolve_dtype(dtype)
        )
    except OSError as exc:
        if Path(source).is_dir():
            raise ModelLoadError(f"could not load the model in {source}: {exc}") from exc
        raise ModelLoadError(
            f"could not download {source!r}; pass a local path or use toyworld"
        ) from exc
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(f"could not load {source!r}: {exc}") from exc
    return prepare_bridge(bridge, coordinates)


def prepare_bridge(bridge: TransformerBridge, coordinates: str) -> TransformerBridge:
    """``bridge`` in eval mode and in ``coordinates``: processed folds LayerNorm and
    centres the weights (TransformerLens's compatibility mode), raw leaves them."""
    if coordinates == "processed":
        bridge.enable_compatibility_mode(disable_warnings=True)
        return_freed_memory()
    bridge.eval()
    return bridge
