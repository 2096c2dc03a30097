"""The paper's experiment as a sweep: for every (layer ℓ, τ, encoding[, head]) cell, how
much does injecting a prompt's memory raise the probability of its answer, against
random controls?

Semantics (docs/reproducing.md). A cell injects with the ``add`` strategy at
``blocks.ℓ.hook_attn_out`` (or head h's ``attn.hook_result``): ``a ← a + τ·v`` at
**every position of the sequence fed to the model**, i.e. positions ``"all"`` as in the
paper (with ``--answer-metric full`` the teacher-forced answer tokens are part of that
sequence, exactly as ``"all"`` covers generated tokens in ``generate``). ``v`` comes from
the registered encoder (``registry.encoders[name]`` through an
:class:`~meminject.extension.EncodeRequest`), so plugin encoders work in sweeps.
Controls are memories of random tokens with the same token count as the real memory,
drawn from a seed, the row's id and the control's index — so a row gets the same
controls whatever the sharding or batching.

The answer's tokens are the continuation of ``prompt + " " + answer`` after the
prompt's own tokens (no space is added when the prompt ends with, or the answer starts
with, whitespace); if a tokenizer merges across that boundary, ``" " + answer`` is
tokenized on its own instead. The CSV strings are never edited.

The ``first-token`` metric is the probability of the answer's first token after the
prompt; ``full`` is the probability of the whole answer, teacher-forced (the exponent of
the summed log-probabilities). Per cell the summary (:mod:`meminject.sweep.stats`) holds
paired per-prompt statistics in log-probability — the median gain over both no memory
and the controls (the default ranking), the median effect against the controls, the
median lift, with bootstrap intervals — beside the paper's mean percent increase
``100·mean((after − before)/before)``, the median percent change, the share of prompts
improved and the mean change of p, and the same for the controls.

Why it is fast, and why that is still exact:

* **The base pass runs once per prompt**, batched. Prompts are right-padded: the models
  are causal, so a real token never attends to the padding after it and its positions
  are the unpadded ones; each row is read at its own last real position(s). No
  attention mask is needed, and none is passed.
* **Layers before ℓ are not recomputed.** During the base pass a forward pre-hook on
  every block records the block's input (the residual stream) and the other arguments
  the Hugging Face model passes it (causal mask, rotary position embeddings, …). A cell
  at layer ℓ re-runs only blocks ℓ…L−1 from the recorded residual, with a hook at
  ``blocks.ℓ.hook_attn_out`` adding each row's ``τ·v``, then the final norm and the
  unembedding — at the read positions only. (``TransformerBridge.forward`` has a
  ``start_at_layer``, but it still executes blocks 0…ℓ−1 and discards their output, so
  it saves nothing.) Every batch first re-runs the blocks from the lowest swept layer
  without an injection and compares with the base pass; if an architecture breaks the
  replay (a difference above 1e-4 in log-probability) that batch falls back to full
  forward passes with the same hook, which is always correct.
* **Heads are routed, not summed.** Adding ``v`` to one head's result adds exactly ``v``
  to the attention output (docs/architecture.md#strategies): on ``attn_result`` every head would be
  the same cell. A head cell instead routes the memory *through* the head (site
  ``attn_z``, :mod:`meminject.heads`): the head's value mix moves by ``τ·v·pinv(W_O[h])``,
  i.e. the attention output by ``τ·v·P_h``, the part of the memory the head can write.
  That vector is added where the whole-layer cell adds ``τ·v`` (before the post-attention
  norm on Gemma 2/3), so a head cell costs one replay like any other, and the records
  carry each memory's ``head_share`` ‖v·P_h‖/‖v‖. The tests compare head cells with a
  hand-made edit of the head's own ``attn.hook_z``.
* **τ = 0 is the base pass** (the engine installs no hook for it either).
* Controls share the batches and the recorded residuals. Memory does not grow with the
  number of cells: per batch only the recorded residuals (one per layer) live; per cell
  only each row's log-probability (8 bytes) is kept.

:func:`reference_cell` is the plain loop the sweep must agree with (two forward passes
through :func:`meminject.engine.inject` with an :class:`~meminject.schema.AddMemory`);
the tests hold every cell to 1e-5 against it, and ``benchmarks/bench_sweep.py`` times
the two.

The package, by concern: :mod:`~meminject.sweep.config` (what to sweep),
:mod:`~meminject.sweep.rows` (tokenized rows, answer tokens, controls, shards),
:mod:`~meminject.sweep.encoding` (encoding labels, a cell's memory, its vectors),
:mod:`~meminject.sweep.replay` (the batched base pass and replays),
:mod:`~meminject.sweep.run` (:func:`run_sweep`), :mod:`~meminject.sweep.ray_executor`
(:func:`run_sweep_ray`: the same sweep as Ray tasks), :mod:`~meminject.sweep.records` (tidy
records, resume, files), :mod:`~meminject.sweep.reference` (the plain loop) and
:mod:`~meminject.sweep.stats` (per-cell statistics); the heatmap is
:func:`meminject.plots.plot_heatmap` (plots sit above the sweep: they read its
statistics). Every public name of the sweep's modules is importable from here too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meminject.sweep.config import METRICS as METRICS
    from meminject.sweep.config import TAU_UNITS as TAU_UNITS
    from meminject.sweep.config import SweepConfig as SweepConfig
    from meminject.sweep.encoding import encode_text as encode_text
    from meminject.sweep.encoding import encoding_label as encoding_label
    from meminject.sweep.encoding import encoding_parts as encoding_parts
    from meminject.sweep.encoding import sweep_memory as sweep_memory
    from meminject.sweep.ray_executor import run_sweep_ray as run_sweep_ray
    from meminject.sweep.records import OUTPUT_SUFFIXES as OUTPUT_SUFFIXES
    from meminject.sweep.records import SweepFiles as SweepFiles
    from meminject.sweep.records import SweepResult as SweepResult
    from meminject.sweep.records import check_output_path as check_output_path
    from meminject.sweep.records import partial_path as partial_path
    from meminject.sweep.records import read_records as read_records
    from meminject.sweep.records import write_records as write_records
    from meminject.sweep.reference import reference_cell as reference_cell
    from meminject.sweep.replay import REPLAY_TOLERANCE as REPLAY_TOLERANCE
    from meminject.sweep.replay import residual_norms as residual_norms
    from meminject.sweep.rows import TokenizedRow as TokenizedRow
    from meminject.sweep.rows import answer_tokens as answer_tokens
    from meminject.sweep.rows import control_texts as control_texts
    from meminject.sweep.rows import shard_rows as shard_rows
    from meminject.sweep.rows import tokenize_row as tokenize_row
    from meminject.sweep.run import run_sweep as run_sweep
    from meminject.sweep.stats import CELL_COLUMNS as CELL_COLUMNS
    from meminject.sweep.stats import best_cell as best_cell
    from meminject.sweep.stats import summarize as summarize

#: Each public name's module. A name's module is imported when the name is first asked
#: for, not with the package: ``meminject --help`` loads :mod:`meminject.sweep.stats`,
#: and that must not bring pydantic and the schema (:mod:`~meminject.sweep.encoding`).
_HOMES: dict[str, str] = {
    **dict.fromkeys(("METRICS", "TAU_UNITS", "SweepConfig"), "meminject.sweep.config"),
    **dict.fromkeys(
        ("TokenizedRow", "answer_tokens", "control_texts", "shard_rows", "tokenize_row"),
        "meminject.sweep.rows",
    ),
    **dict.fromkeys(
        ("encode_text", "encoding_label", "encoding_parts", "sweep_memory"),
        "meminject.sweep.encoding",
    ),
    **dict.fromkeys(("REPLAY_TOLERANCE", "residual_norms"), "meminject.sweep.replay"),
    **dict.fromkeys(
        (
            "OUTPUT_SUFFIXES",
            "SweepFiles",
            "SweepResult",
            "check_output_path",
            "partial_path",
            "read_records",
            "write_records",
        ),
        "meminject.sweep.records",
    ),
    "reference_cell": "meminject.sweep.reference",
    "run_sweep": "meminject.sweep.run",
    "run_sweep_ray": "meminject.sweep.ray_executor",
    **dict.fromkeys(("CELL_COLUMNS", "best_cell", "summarize"), "meminject.sweep.stats"),
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    module = _HOMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
