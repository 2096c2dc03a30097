"""The plain loop the fast sweep is held to: one prompt and one cell, two ordinary
forward passes, the second inside :func:`meminject.engine.inject`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from meminject.sweep.encoding import sweep_memory
from meminject.sweep.rows import tokenize_row

if TYPE_CHECKING:
    from torch import Tensor

    from meminject.datasets import PromptRow
    from meminject.model_handle import LoadedModel
    from meminject.plugins import Registry


def reference_cell(
    model: LoadedModel,
    row: PromptRow,
    *,
    layer: int,
    tau: float,
    encoding: str = "unembed",
    head: int | None = None,
    metric: str = "first-token",
    memory_text: str | None = None,
    registry: Registry | None = None,
    tau_units: str = "absolute",
    resid_norm: float | None = None,
    positions: str = "all",
    length_of: str | None = None,
) -> tuple[float, float]:
    """The plain loop: ``(p_before, p_after)`` for one prompt and one cell, from two
    ordinary forward passes, the second inside :func:`meminject.engine.inject` with the
    cell's :class:`AddMemory` (``memory_text`` replaces the row's memory, for controls;
    ``positions`` is the sweep's, written as the file's explicit position list).
    With a ``head`` it is a memory routed through that head (site ``attn_z``), compiled
    as in a file. ``length_of``: in absolute units, the vector is rescaled to the length
    of this text's vector in the same cell (a control matched to the row's memory,
    ``control_norm = "memory"``), written as a file does it: a ``resid_norm`` memory
    whose norm is that length."""
    import torch

    from meminject.engine import inject
    from meminject.memfile import LoadedFile, MemoryEntry, MemorySet

    tokenized = tokenize_row(model, row, metric)
    if length_of is not None and tau_units == "absolute":
        from meminject.sweep.encoding import encode_text

        matched = encode_text(
            model, length_of, layer=layer, encoding=encoding, registry=registry, head=head
        )
        tau_units, resid_norm = "resid_norm", float(matched.float().norm())
    memory = sweep_memory(
        memory_text if memory_text is not None else row.memory,
        layer=layer,
        tau=tau,
        encoding=encoding,
        head=head,
        registry=registry,
        tau_units=tau_units,
        resid_norm=resid_norm,
    )
    if positions != "all":
        first = tokenized.read_positions[0]  # the prompt's last token
        chosen = [first] if positions == "last" else list(range(1, len(tokenized.input_ids)))
        memory = memory.model_copy(update={"positions": chosen})
    where = Path("<sweep>")
    memory_set = MemorySet(files=(LoadedFile(where, None, (MemoryEntry(memory, where, 0, ""),)),))
    tokens = torch.tensor([tokenized.input_ids], dtype=torch.long, device=model.device)
    read = torch.tensor([tokenized.read_positions], device=model.device)
    targets = torch.tensor([tokenized.targets], device=model.device)
    with torch.no_grad():
        plain = model.bridge(tokens)
        with inject(model, memory_set, registry=registry):
            injected = model.bridge(tokens)

    def prob(logits: Tensor) -> float:
        logp = logits[0, read[0]].float().log_softmax(-1).gather(-1, targets[0][:, None])
        return math.exp(float(logp.double().sum()))

    return prob(plain), prob(injected)
