"""Memories as a llama.cpp control vector (``meminject export --format llama-cpp``).

llama.cpp can add one fixed vector to the output of each decoder block, at every
position (``--control-vector FILE.gguf``). The file format, from llama.cpp's
``common_control_vector_load_one`` and ``llama_adapter_cvec``:

* ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model's
  architecture) and ``controlvector.layer_count`` (how many directions are stored);
* tensors ``direction.N``: float32, 1-D of width ``n_embd``, added to the output of
  0-based block N (Hugging Face ``hidden_states[N + 1]``, meminject's
  ``blocks.N.hook_resid_post``). The loader rejects N = 0, so block 0 cannot be
  expressed.

So the memories that fit are ``add`` memories at ``resid_post`` with ``positions =
"all"``, at layer 1 or above; every other memory is refused with its own reason (one
line each) before anything is written. Memories at the same layer add up into one
direction, and τ is baked in: ``direction.N = Σ τ·v`` (llama.cpp's
``--control-vector-scaled FILE:S`` still scales the whole file).

Coordinates: the vectors are computed as meminject computes them for the memory's own
``[model] coordinates`` (processed by default), and written as they are. A change to
the residual stream carries over to the raw checkpoint llama.cpp runs: in processed
coordinates the residual stream is the raw one (RMSNorm models) or the raw one minus
its mean over d_model (LayerNorm models, whose every reader centres its input first),
so adding the same vector to either gives the same next-token distribution. A test
checks it by adding the file's directions to the raw Hugging Face model with plain
PyTorch hooks.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError

if TYPE_CHECKING:
    from meminject.memfile import MemoryEntry, MemorySet
    from meminject.model_handle import LoadedModel

ARCHITECTURE = "controlvector"


class NotExpressible(BadInputError):
    """Memories a control vector cannot hold; ``problems`` has one line per memory."""

    def __init__(self, problems: list[str]):
        super().__init__(f"{len(problems)} memories cannot be a llama.cpp control vector")
        self.problems = problems


def refusal(entry: MemoryEntry) -> str | None:
    """Why llama.cpp's control vectors cannot express this memory, or None if they can."""
    memory = entry.memory
    if memory.strategy != "add":
        return f"it is a '{memory.strategy}' memory; control vectors only add a fixed vector"
    site = memory.resolved_site
    if site != "resid_post":
        return f"it is at site '{site}'; control vectors add to a block's output (resid_post)"
    if memory.positions != "all":
        return f"it adds at positions {memory.positions!r}; control vectors add at every position"
    if memory.layer == 0:
        return "it is at layer 0; llama.cpp's loader rejects a direction for block 0"
    return None


def directions(model: LoadedModel, memory_set: MemorySet, **compile_options: Any) -> dict:
    """``{block: float32 direction}`` for the set's enabled memories, or a BadInputError
    listing every memory that does not fit, one line each."""
    import torch

    from meminject.engine import compile_memories

    entries = [
        e for e in memory_set.entries if e.memory.enabled and getattr(e.memory, "tau", 1) != 0
    ]
    if not entries:
        raise BadInputError("the memory set has no enabled memory to export")
    problems = [
        f"{entry.location().render()}: {reason}"
        for entry in entries
        if (reason := refusal(entry)) is not None
    ]
    if problems:
        raise NotExpressible(problems)
    summed: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(model.dims.d_model))
    for compiled in compile_memories(model, memory_set, **compile_options):
        additions = compiled.hook.additions
        if not additions:  # pragma: no cover - every refusal-free memory compiles to data
            raise BadInputError(f"hook '{compiled.hook.hook_name}' is not a plain addition")
        for addition in additions:
            summed[addition.layer] += addition.vector.detach().float().cpu()
    return dict(sorted(summed.items()))


def model_hint(model: LoadedModel) -> str:
    """The architecture name llama.cpp gives the model (``llama``, ``gpt2``, ``gemma3``)."""
    if model.served is not None:
        config = model.served.hf.config
    else:
        config = model.bridge.original_model.config
    return str(getattr(config, "model_type", "") or model.name)


def write_control_vector(
    path: Path, vectors: dict[int, Any], *, hint: str, overwrite: bool = False
) -> None:
    """Write ``vectors`` (block → 1-D tensor) as a control-vector GGUF, atomically."""
    import gguf
    import numpy as np

    if path.exists() and not overwrite:
        raise BadInputError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    from meminject.atomic import temp_beside

    fd, tmp = temp_beside(path)  # the mode every written file gets, not mkstemp's 0600
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", hint)
        writer.add_int32(f"{ARCHITECTURE}.layer_count", len(vectors))
        for layer, vector in vectors.items():
            writer.add_tensor(f"direction.{layer}", np.asarray(vector, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_control_vector(path: Path) -> tuple[dict[str, Any], dict[int, Any]]:
    """The metadata and ``{block: numpy direction}`` of a control-vector GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith(("general.architecture", f"{ARCHITECTURE}.")):
            value = field.parts[field.data[0]]
            meta[name] = (
                bytes(value).decode("utf-8")
                if field.types[0] == gguf.GGUFValueType.STRING
                else value.tolist()[0]
            )
    tensors = {
        int(t.name.removeprefix("direction.")): t.data.copy()
        for t in reader.tensors
        if t.name.startswith("direction.")
    }
    return meta, tensors
