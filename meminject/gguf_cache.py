"""GGUF files as cached Hugging Face directories: dequantize once, load many times.

Why a cache: ``transformers`` reads GGUF by dequantizing every tensor (tens of
seconds for a 135M model on two cores), and TransformerBridge boots from a model
directory. Dequantizing once into a plain float32 directory, keyed by the GGUF's
content hash, makes every later load an ordinary local load, and lets the
generation fast path re-open the same checkpoint.

Why a fresh model: a model loaded from GGUF carries a ``quantization_config``
that makes ``save_pretrained`` refuse it, so the state dict is copied into a model
built from the same config without it.

The directory is written under a temporary name in the cache and renamed into
place only when complete, so an interrupted or failed conversion (a full disk,
a corrupt file) leaves nothing that a later load could mistake for a model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from meminject.atomic import publish_dir
from meminject.errors import ModelLoadError

CACHE_ENV = "MEMINJECT_CACHE"
GGUF_MAGIC = b"GGUF"
#: Written last into a converted directory; its presence means the directory is whole.
MARKER = "meminject-gguf.json"
_HASH_INDEX = "hashes.json"


def cache_root() -> Path:
    """``$MEMINJECT_CACHE``, else the platform's user cache directory for meminject."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("meminject"))


def is_gguf_path(target: str | os.PathLike[str]) -> bool:
    return str(target).lower().endswith(".gguf")


def check_gguf_file(path: Path) -> None:
    """A clear error for a missing, non-regular or non-GGUF file, before heavy imports."""
    if not path.exists():
        raise ModelLoadError(f"no GGUF file at {path}")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a regular file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF')")


def content_hash(path: Path, root: Path | None = None) -> str:
    """sha256 of the file, remembered per (path, size, mtime) so a cached load does not
    re-read hundreds of megabytes."""
    root = root or cache_root()
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = root / "gguf" / _HASH_INDEX
    index: dict[str, str] = {}
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(key), str):
        return index[key]
    from meminject import progress

    digest = hashlib.sha256()
    with (
        path.open("rb") as handle,
        progress.bar(f"reading {path.name}", stat.st_size, unit="bytes") as advance,
    ):
        while block := handle.read(1 << 22):
            digest.update(block)
            advance(len(block))
    value = digest.hexdigest()
    index = index if isinstance(index, dict) else {}
    index[key] = value
    try:
        from meminject.atomic import write_text_atomic

        write_text_atomic(index_path, json.dumps(index, indent=1), overwrite=True)
    except OSError:
        pass  # the index only saves time; a read-only cache still works
    return value


def cached_dir_for(path: Path, root: Path | None = None) -> Path:
    """Where the dequantized copy of ``path`` lives (it may not exist yet)."""
    root = root or cache_root()
    return root / "gguf" / content_hash(path, root)[:32]  # as dequantized_dir names it


def is_converted(directory: Path) -> bool:
    return (directory / MARKER).is_file() and (directory / "config.json").is_file()


def dequantized_dir(path: str | os.PathLike[str], root: Path | None = None) -> Path:
    """The cached Hugging Face directory for the GGUF file at ``path``, made if missing."""
    gguf_path = Path(path).expanduser()
    check_gguf_file(gguf_path)
    root = root or cache_root()
    sha256 = content_hash(gguf_path, root)
    target = root / "gguf" / sha256[:32]
    if is_converted(target):
        return target
    architecture = _architecture(gguf_path)
    _check_supported(gguf_path, architecture)
    from meminject import progress

    progress.note(
        f"first use of {gguf_path.name}: converting its weights to float32 and caching "
        f"them, once (about {_estimate_mb(gguf_path):,} MB in {root / 'gguf'}; "
        "this takes a minute or two on a CPU)"
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    except OSError as exc:
        raise ModelLoadError(f"cannot write to the model cache {target.parent}: {exc}") from exc
    try:
        _convert(gguf_path, work)
        marker = {
            "gguf": str(gguf_path.resolve()),
            "sha256": sha256,
            "architecture": architecture,
        }
        (work / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        # A half-made target is from an older meminject; a whole one, from a race.
        publish_dir(work, target, is_converted)
        progress.note(
            f"cached {gguf_path.name} as {target} "
            f"({progress.human_size(progress.size_of(target))}; later runs start from it; "
            "delete it to free the space)"
        )
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ModelLoadError(
                f"no space left in the model cache {root} while dequantizing {gguf_path} "
                f"(it needs about {_estimate_mb(gguf_path)} MB; set {CACHE_ENV} to a larger disk)"
            ) from exc
        raise ModelLoadError(f"could not dequantize {gguf_path}: {exc}") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _estimate_mb(path: Path) -> int:
    # Q4 weights take about half a byte each; float32 takes four.
    return int(path.stat().st_size * 8 / 1e6)


def _architecture(path: Path) -> str:
    """``general.architecture`` from the header; a truncated or corrupt file fails here."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ModelLoadError(f"{path} has no general.architecture in its GGUF header")
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    except ModelLoadError:
        raise
    except ImportError as exc:
        raise ModelLoadError(
            "reading GGUF files needs the 'gguf' package: pip install gguf"
        ) from exc
    except Exception as exc:  # numpy raises ValueError/IndexError/... on short files
        raise ModelLoadError(
            f"{path} is truncated or corrupt: its GGUF header or tensor table could not be read"
        ) from exc


def _check_supported(path: Path, architecture: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a != "general")
        raise ModelLoadError(
            f"{path}: transformers cannot dequantize GGUF architecture '{architecture}' "
            f"(it reads {supported})"
        )


def _convert(path: Path, out: Path) -> None:
    """Dequantize into ``out`` as float32 safetensors, with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meminject import progress

    try:
        with progress.step(f"dequantizing {path.name} (transformers)"):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            quantized: Any = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
    except OSError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"transformers could not read {path}: {exc}") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with progress.step("copying the weights into a plain model"):
        plain: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
    with progress.step(f"writing float32 safetensors to {out.parent}"):
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
