"""The paper's experiment as a sweep: for every (layer ℓ, τ, encoding[, head]) cell, how
much does injecting a prompt's memory raise the probability of its answer, against
random controls?

Semantics (DESIGN §4, §8). A cell injects with the ``add`` strategy at
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
the summed log-probabilities). Per cell the summary (:mod:`meminject.sweep_stats`) holds
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
  to the layer's attention output (DESIGN §4), so on ``attn_result`` every head would be
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
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import random
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject import sweep_stats
from meminject.datasets import PromptRow
from meminject.errors import BadInputError, MeminjectError, PluginError
from meminject.heads import through_head
from meminject.schema import AddMemory

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from jaxtyping import Float, Int
    from torch import Tensor

    from meminject.models import LoadedModel
    from meminject.plugins import Registry

METRICS = ("first-token", "full")
TAU_UNITS = ("absolute", "resid_norm")
OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq")

#: Largest difference in log-probability between the replayed and the full forward
#: pass that still counts as "the replay reproduces the model" (float32 noise is ~1e-6).
REPLAY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep. ``heads=None`` injects into the whole attention output."""

    layers: tuple[int, ...]
    taus: tuple[float, ...]
    encodings: tuple[str, ...] = ("unembed",)
    heads: tuple[int, ...] | None = None
    controls: int = 0
    batch_size: int = 16
    shard: tuple[int, int] = (0, 1)
    metric: str = "first-token"
    seed: int = 0
    #: "absolute" (τ·v, the paper's) or "resid_norm" (τ·N_ℓ·v/‖v‖, N_ℓ the layer's mean
    #: residual-stream norm over the dataset's prompts).
    tau_units: str = "absolute"
    #: (layer, N_ℓ) pairs; measured by :func:`run_sweep` when not given.
    resid_norms: tuple[tuple[int, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.tau_units not in TAU_UNITS:
            raise BadInputError(f"unknown τ units '{self.tau_units}'; choose {TAU_UNITS}")
        if not self.layers or not self.taus or not self.encodings:
            raise BadInputError("a sweep needs at least one layer, one τ and one encoding")
        if self.heads is not None and not self.heads:
            raise BadInputError("--heads names no head")
        if self.metric not in METRICS:
            raise BadInputError(f"unknown answer metric '{self.metric}'; choose {METRICS}")
        if self.controls < 0:
            raise BadInputError("--controls must be >= 0")
        if self.batch_size < 1:
            raise BadInputError("--batch-size must be >= 1")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise BadInputError(f"shard {index}/{count}: need 0 <= i < n")
        for tau in self.taus:
            if not math.isfinite(tau):
                raise BadInputError(f"τ = {tau} is not a finite number")

    @property
    def n_cells(self) -> int:
        heads = len(self.heads) if self.heads is not None else 1
        return len(self.layers) * len(self.taus) * len(self.encodings) * heads


# --------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class TokenizedRow:
    """A row as the model sees it: the input ids, and which logits score which targets."""

    row: PromptRow
    input_ids: list[int]
    read_positions: list[int]  # logits at these positions …
    targets: list[int]  # … score these tokens


def answer_tokens(model: LoadedModel, prompt: str, answer: str) -> list[int]:
    """The answer's tokens as a continuation of the prompt (see the module docstring)."""
    sep = "" if prompt[-1:].isspace() or answer[:1].isspace() else " "
    head = model.tokenize(prompt, prepend_bos=False)
    full = model.tokenize(prompt + sep + answer, prepend_bos=False)
    if len(full) > len(head) and full[: len(head)] == head:
        return full[len(head) :]
    return model.tokenize(sep + answer, prepend_bos=False)


def tokenize_row(model: LoadedModel, row: PromptRow, metric: str = "first-token") -> TokenizedRow:
    """Input ids (BOS as the model prepends it), read positions and targets of a row."""
    prompt_ids = model.tokenize(row.prompt)
    answer = answer_tokens(model, row.prompt, row.answer)
    if not prompt_ids:
        raise BadInputError(f"row {row.row_id}: the prompt encodes to no tokens")
    if not answer:
        raise BadInputError(f"row {row.row_id}: the answer {row.answer!r} encodes to no tokens")
    if metric == "first-token":
        ids, targets = prompt_ids, answer[:1]
    elif metric == "full":
        ids, targets = prompt_ids + answer[:-1], answer
    else:
        raise BadInputError(f"unknown answer metric '{metric}'; choose {METRICS}")
    if len(ids) > model.dims.n_ctx:
        raise BadInputError(
            f"row {row.row_id}: {len(ids)} tokens, longer than the model's context of "
            f"{model.dims.n_ctx}"
        )
    first = len(prompt_ids) - 1
    return TokenizedRow(row, ids, list(range(first, first + len(targets))), targets)


# --------------------------------------------------------------------------- controls

#: Per model: token id → "word" (decodes to " letters" and re-tokenizes to itself),
#: "other" (re-tokenizes to itself) or None (unusable). Filled lazily as tokens are drawn.
_TOKEN_KINDS: weakref.WeakKeyDictionary[Any, dict[int, str | None]] = weakref.WeakKeyDictionary()


def _token_kind(model: LoadedModel, token: int) -> str | None:
    kinds = _TOKEN_KINDS.setdefault(model, {})
    if token not in kinds:
        text = model.token_str(token)
        kind: str | None = None
        usable = bool(text) and "\ufffd" not in text and text.isprintable()
        if usable and model.tokenize(text, prepend_bos=False) == [token]:
            word = text[1:]
            is_word = text[0] == " " and len(word) >= 2 and word.isascii() and word.isalpha()
            kind = "word" if is_word else "other"
        kinds[token] = kind
    return kinds[token]


def _draw_tokens(
    model: LoadedModel, rng: random.Random, length: int, banned: set[int]
) -> list[int]:
    """``length`` distinct tokens drawn uniformly from the vocabulary's words (tokens that
    decode to a space and letters, so their concatenation re-tokenizes to them); from any
    self-contained token when a tokenizer has too few such words."""
    tokenizer = model.tokenizer
    vocab = min(model.dims.d_vocab, len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for accepted in (("word",), ("word", "other")):
        chosen: list[int] = []
        for _ in range(200 * length + 1000):
            token = rng.randrange(vocab)
            if token in banned or token in special or token in chosen:
                continue
            if _token_kind(model, token) in accepted:
                chosen.append(token)
                if len(chosen) == length:
                    return chosen
    raise BadInputError(f"model '{model.name}': too few usable tokens to draw controls from")


def control_texts(model: LoadedModel, row: PromptRow, n: int, seed: int) -> list[str]:
    """``n`` random-token memories for ``row``, each with as many tokens as its memory.

    Seeded by ``(seed, row_id, index)`` only, so sharding and batching never change
    them. The memory's and the answer's own tokens are excluded, so a control cannot
    contain the answer by chance; a draw whose text does not re-tokenize to the drawn
    tokens is redrawn, so the control really has that many tokens.
    """
    if n <= 0:
        return []
    memory_ids = model.tokenize(row.memory, prepend_bos=False)
    if not memory_ids:
        raise BadInputError(f"row {row.row_id}: the memory {row.memory!r} encodes to no tokens")
    banned = set(memory_ids) | set(answer_tokens(model, row.prompt, row.answer))
    texts = []
    for index in range(n):
        rng = random.Random(f"meminject-control:{seed}:{row.row_id}:{index}")
        for _ in range(100):
            ids = _draw_tokens(model, rng, len(memory_ids), banned)
            text = model.decode(ids)
            if model.tokenize(text, prepend_bos=False) == ids:
                texts.append(text)
                break
        else:
            raise BadInputError(
                f"row {row.row_id}: could not draw a {len(memory_ids)}-token control that "
                "survives decoding and re-tokenizing with this tokenizer"
            )
    return texts


# --------------------------------------------------------------------------- encoders


def encoding_parts(label: str, registry: Registry | None = None) -> tuple[str, Any]:
    """The encoder name and validated parameters an encoding label stands for.

    A label is a registered encoder's name (``unembed``), optionally followed by its
    ``[memory.params]`` as a TOML inline table: ``pooled{reduce = "max"}``. Parameters
    not given take the encoder's defaults. Errors name the label and the parameter."""
    from pydantic import ValidationError

    from meminject.plugins import get_registry
    from meminject.schema import params_message

    registry = registry or get_registry()
    name, given = _parsed_label(label)
    if name not in registry.encoders:
        known = ", ".join(sorted(registry.encoders))
        raise BadInputError(
            f"unknown encoding '{name}'; registered: {known}" + registry.plugins_off_note()
        )
    params_model = registry.encoders[name].params_model
    if params_model is None:
        if given:
            raise BadInputError(f"encoding '{label}': encoder '{name}' takes no parameters")
        return name, None
    try:
        return name, params_model.model_validate(dict(given))
    except ValidationError as exc:
        error = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        key = ".".join(str(p) for p in error["loc"])
        message = params_message(error, name, params_model)
        raise BadInputError(f"encoding '{label}': parameter '{key}': {message}") from None


@functools.lru_cache(maxsize=256)
def _parsed_label(label: str) -> tuple[str, dict[str, Any]]:
    """An encoding label's encoder name and given parameters, parsed once per label: a
    sweep builds a memory for every text of every cell from the same few labels. The
    dict is shared; callers copy it before handing it on."""
    name, brace, rest = label.partition("{")
    return name.strip(), (_inline_table(label, "{" + rest) if brace else {})


def _inline_table(label: str, table: str) -> dict[str, Any]:
    import tomllib

    try:
        value = tomllib.loads(f"params = {table}")["params"]
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(
            f"encoding '{label}': the parameters must be a TOML inline table, such as "
            f'pooled{{reduce = "max"}} ({exc})'
        ) from None
    if not isinstance(value, dict):
        raise BadInputError(f"encoding '{label}': the parameters must be an inline table")
    return value


def encoding_label(label: str, registry: Registry | None = None) -> str:
    """``label`` written one way: the name, then the given parameters sorted by key
    (``pooled{reduce = "max", source = "embed"}``), so results and resumes match."""
    from meminject.memfile import toml_value

    encoding_parts(label, registry)  # valid, or a clear error
    name, given = _parsed_label(label)
    if not given:
        return name
    items = ", ".join(f"{key} = {toml_value(given[key])}" for key in sorted(given))
    return f"{name}{{{items}}}"


def sweep_memory(
    text: str,
    *,
    layer: int,
    tau: float,
    encoding: str,
    head: int | None = None,
    registry: Registry | None = None,
    tau_units: str = "absolute",
    resid_norm: float | None = None,
) -> AddMemory:
    """The :class:`AddMemory` a cell stands for (positions ``"all"``), with the encoder's
    parameters (from the encoding label, defaults for the rest) attached."""
    name, params = encoding_parts(encoding, registry)
    given = dict(_parsed_label(encoding)[1])
    memory = AddMemory.model_validate(
        {
            "name": "sweep",
            "text": text,
            "layer": layer,
            "tau": float(tau),
            "encoding": name,
            "params": given or None,
            "head": head,
            "site": "attn_z" if head is not None else None,
            "positions": "all",
            "tau_units": tau_units,
            "resid_norm": resid_norm,
        }
    )
    if params is not None:
        # Same mechanism the schema's validator uses to attach a file's params table.
        object.__setattr__(memory, "_encoder_params", params)
    return memory


def encode_text(
    model: LoadedModel, text: str, *, layer: int, encoding: str, registry: Registry | None = None
) -> Float[Tensor, " d_model"]:
    """``v`` for ``text`` from the registered encoder, exactly as the engine computes it."""
    from meminject.engine import checked_encoding
    from meminject.extension import EncodeRequest
    from meminject.plugins import get_registry

    registry = registry or get_registry()
    memory = sweep_memory(text, layer=layer, tau=1.0, encoding=encoding, registry=registry)
    entry = registry.encoders[memory.encoding]
    try:
        vector = entry.encoder(EncodeRequest(model, memory, memory.encoder_params()))
    except MeminjectError:
        raise
    except Exception as exc:
        raise PluginError(
            entry.plugin, f"encoder '{encoding}' failed on {text!r}: {exc!r}"
        ) from exc
    vector = checked_encoding(vector, model, entry, f"the sweep's text {text!r}")
    return vector.detach().to(device=model.device, dtype=model.dtype)


#: Built-in encoders whose vector does not depend on the layer; computed once per text.
_LAYER_FREE = {("meminject.encoders", "unembed"), ("meminject.encoders", "embed")}


# --------------------------------------------------------------------------- the fast path


def _strip_cache(value: Any) -> Any:
    """Drop the KV cache the bridge threads through the blocks: a replay must not append
    to it (the blocks would then attend to the base pass's keys as well)."""
    from transformers.cache_utils import Cache

    return None if isinstance(value, Cache) else value


def _log_probs(
    logits: Float[Tensor, "batch n_read d_vocab"],
    targets: Int[Tensor, "batch n_read"],
    valid: Float[Tensor, "batch n_read"],
) -> Float[Tensor, " batch"]:
    logp = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return (logp * valid).sum(-1)


class _Batch:
    """One right-padded batch of rows: the base pass, then replays from any layer."""

    def __init__(self, model: LoadedModel, rows: Sequence[TokenizedRow], keep: set[int]) -> None:
        import torch

        self.model = model
        self.bridge = model.bridge
        self.size = len(rows)
        width = max(len(r.input_ids) for r in rows)
        n_read = max(len(r.targets) for r in rows)
        pad = self._pad_id()
        tokens = torch.full((self.size, width), pad, dtype=torch.long)
        read = torch.zeros((self.size, n_read), dtype=torch.long)
        targets = torch.zeros((self.size, n_read), dtype=torch.long)
        valid = torch.zeros((self.size, n_read), dtype=torch.float32)
        for i, r in enumerate(rows):
            tokens[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
            k = len(r.targets)
            read[i, :k] = torch.tensor(r.read_positions)
            read[i, k:] = r.read_positions[-1]
            targets[i, :k] = torch.tensor(r.targets)
            valid[i, :k] = 1.0
        device = model.device
        self.tokens = tokens.to(device)
        self.read = read.to(device)
        self.targets = targets.to(device)
        self.valid = valid.to(device)
        self.keep = keep  # layers whose incoming residual is kept
        self.inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def _pad_id(self) -> int:
        tok = self.model.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def base(self) -> Float[Tensor, " batch"]:
        """Full forward pass; records every kept block's input and arguments."""
        import torch

        first = min(self.keep)
        handles = []
        for index, block in enumerate(self.bridge.blocks):
            if index < first:
                continue

            def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], i=index) -> None:
                if args:
                    hidden, rest = args[0], args[1:]
                else:  # some models pass the residual by keyword
                    hidden, rest = kwargs.get("hidden_states"), ()
                named = {k: _strip_cache(v) for k, v in kwargs.items() if k != "hidden_states"}
                if "use_cache" in named:
                    named["use_cache"] = False
                kept = hidden if i in self.keep else None
                self.inputs[i] = ((kept, *(_strip_cache(a) for a in rest)), named)

            handles.append(block.register_forward_pre_hook(record, with_kwargs=True))
        try:
            with torch.no_grad():
                logits = self.bridge(self.tokens)
        finally:
            for handle in handles:
                handle.remove()
        if len(self.inputs) != len(self.bridge.blocks) - first or not isinstance(
            self.inputs[first][0][0], torch.Tensor
        ):
            self.inputs.clear()  # the replay cannot work: every cell will run in full
        return self._score(logits)

    def _score(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        index = self.read[..., None].expand(-1, -1, logits.shape[-1])
        return _log_probs(logits.gather(1, index), self.targets, self.valid)

    @property
    def can_replay(self) -> bool:
        return bool(self.inputs)

    def replay(self, layer: int) -> Float[Tensor, " batch"]:
        """Blocks ``layer``…L−1 from the recorded residual, then norm and unembedding at
        the read positions only. Hooks installed on the bridge fire as usual."""
        import torch

        blocks = self.bridge.blocks
        with torch.no_grad():
            hidden = self.inputs[layer][0][0]
            for index in range(layer, len(blocks)):
                args, kwargs = self.inputs[index]
                out = blocks[index](hidden, *args[1:], **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            where = self.read[..., None].expand(-1, -1, hidden.shape[-1])
            picked = hidden.gather(1, where)
            logits = self.bridge.unembed(self.bridge.ln_final(picked))
        return _log_probs(logits, self.targets, self.valid)

    def full(self) -> Float[Tensor, " batch"]:
        """A whole forward pass (the fallback; hooks installed on the bridge fire)."""
        import torch

        with torch.no_grad():
            return self._score(self.bridge(self.tokens))


class _Adder:
    """The ``add`` strategy's body with one vector per batch row: ``a ← a + δ_row`` at
    every position. ``delta`` is set before each pass; None leaves the activation as is."""

    def __init__(self) -> None:
        self.delta: Tensor | None = None

    def __call__(self, activation: Float[Tensor, "batch pos d_model"], hook: Any) -> Any:
        if self.delta is None:
            return activation
        return activation + self.delta[:, None, :].to(activation.dtype)


# --------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    """The tidy per-(prompt, cell, memory) records and their per-cell summary."""

    records: pd.DataFrame
    config: SweepConfig
    stats: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def summary(self) -> pd.DataFrame:
        return summarize(self.records)

    def best(self, by: str = sweep_stats.DEFAULT_RANK) -> dict[str, Any] | None:
        """The best cell by ``by`` among the cells that help (None when none does)."""
        return best_cell(self.summary, by)


# The statistics live in their own module; these names are kept here for callers.
CELL_COLUMNS = sweep_stats.CELL_COLUMNS
summarize = sweep_stats.summarize
best_cell = sweep_stats.best_cell


def _records(
    rows: Sequence[PromptRow],
    texts: Sequence[Sequence[str]],
    before: np.ndarray,
    after: np.ndarray,
    share: np.ndarray,
    config: SweepConfig,
) -> pd.DataFrame:
    """Tidy records from the per-row log-probabilities: ``before`` [R], ``after``
    [R, layers, heads, τ, encodings, 1+controls] (one head slot, None, without heads),
    and the share of each memory a head can write, ``share`` [R, layers, heads,
    encodings, 1+controls] (NaN without heads)."""
    import numpy as np
    import pandas as pd

    n_rows, _, n_heads, _, _, n_var = after.shape
    heads = list(config.heads) if config.heads is not None else [None]
    shape = after.shape

    def axis(values: Any, dim: int) -> np.ndarray:
        arr = np.asarray(values)
        view = [1] * len(shape)
        view[dim] = len(arr)
        return np.broadcast_to(arr.reshape(view), shape).ravel()

    with np.errstate(all="ignore"):
        p_before = np.exp(before.astype(np.float64))
        p_after = np.exp(after.astype(np.float64))
        pb = np.broadcast_to(p_before.reshape(n_rows, 1, 1, 1, 1, 1), shape).ravel()
        pa = p_after.ravel()
        lb = np.broadcast_to(
            before.astype(np.float64).reshape(n_rows, 1, 1, 1, 1, 1), shape
        ).ravel()
        la = after.astype(np.float64).ravel()
        change = pa - pb
        pct = 100.0 * change / pb
    memory_text = np.empty((n_rows, n_var), dtype=object)
    for i, row_texts in enumerate(texts):
        memory_text[i, :] = row_texts
    variant = axis(np.arange(n_var), 5)
    head_values = pd.array(heads, dtype="Int64")
    control_values = pd.array([None, *range(n_var - 1)], dtype="Int64")
    frame = pd.DataFrame(
        {
            "row_id": axis([r.row_id for r in rows], 0),
            "layer": axis(list(config.layers), 1),
            "head": head_values.take(axis(np.arange(n_heads), 2)),
            "site": "attn_out" if config.heads is None else "attn_z",
            "tau": axis(np.asarray(config.taus, dtype=np.float64), 3),
            "encoding": pd.Categorical(axis(list(config.encodings), 4)),
            "kind": pd.Categorical(
                np.where(variant == 0, "memory", "control"), categories=["memory", "control"]
            ),
            "control": control_values.take(variant),
            "memory": np.broadcast_to(memory_text.reshape(n_rows, 1, 1, 1, 1, n_var), shape)
            .ravel()
            .astype(str),
            "metric": config.metric,
            "tau_units": config.tau_units,
            "resid_norm": axis(
                [dict(config.resid_norms or ()).get(layer, np.nan) for layer in config.layers], 1
            ).astype(np.float64),
            "head_share": np.broadcast_to(share[:, :, :, None], shape).ravel(),
            "p_before": pb,
            "p_after": pa,
            "logp_before": lb,
            "logp_after": la,
            "change": change,
            "pct_change": pct,
            "improved": pa > pb,
        }
    )
    return frame


# --------------------------------------------------------------------------- the sweep


def _encode_batch(
    model: LoadedModel,
    texts: Sequence[Sequence[str]],
    members: Sequence[int],
    layer: int,
    encoding: str,
    registry: Registry,
) -> Float[Tensor, "variant batch d_model"]:
    """The vectors of every row's memory (variant 0) and controls (1…) in a batch."""
    import torch

    n_var = len(texts[members[0]])
    return torch.stack(
        [
            torch.stack(
                [
                    encode_text(
                        model, texts[i][v], layer=layer, encoding=encoding, registry=registry
                    )
                    for i in members
                ]
            )
            for v in range(n_var)
        ]
    )


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]sweep[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("passes"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def residual_norms(
    model: LoadedModel, rows: Sequence[PromptRow], layers: Sequence[int]
) -> dict[int, float]:
    """Each layer's typical residual-stream norm: the mean of ‖resid_pre(ℓ)‖ over the
    rows' prompt tokens (BOS left out: its norm is often an outlier), in the model's
    loaded coordinates. What ``--tau-units resid_norm`` measures τ in."""
    import torch

    sums = dict.fromkeys(layers, 0.0)
    count = 0
    skip = 1 if model.prepends_bos else 0
    hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = []
    captured: dict[int, Tensor] = {}
    for layer in layers:

        def capture(activation: Tensor, hook: Any, layer: int = layer) -> None:
            captured[layer] = activation[0, skip:].float().norm(dim=-1)

        hooks.append((f"blocks.{layer}.hook_resid_pre", capture))
    with torch.no_grad():
        for row in rows:
            tokens = model.to_tokens(row.prompt)
            model.bridge.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=max(layers) + 1)
            for layer in layers:
                sums[layer] += float(captured[layer].sum())
            count += int(captured[layers[0]].numel())
    if count == 0:
        raise BadInputError("no prompt tokens to measure the residual-stream norm on")
    return {layer: sums[layer] / count for layer in layers}


def _injection_hook(model: LoadedModel, layer: int, heads: Sequence[int] | None) -> str:
    """Where a cell's vector is added: the attention output, or, for a vector routed
    through a head in a block that normalises the attention output (Gemma 2/3), the
    attention's own output before that norm: the same lowering as the engine's."""
    if heads is not None and model.post_sublayer_norms:
        return f"blocks.{layer}.attn.hook_out"
    return f"blocks.{layer}.hook_attn_out"


def _shares(
    routed: Float[Tensor, "variant batch d_model"], stacked: Float[Tensor, "variant batch d_model"]
) -> np.ndarray:
    """‖v·P_h‖ / ‖v‖ per variant and row."""
    full = stacked.float().norm(dim=-1)
    part = routed.float().norm(dim=-1)
    return (part / full.clamp_min(1e-30)).double().cpu().numpy()


def _to_norm(
    stacked: Float[Tensor, "variant batch d_model"], norm: float
) -> Float[Tensor, "variant batch d_model"]:
    """Every vector rescaled to length ``norm`` (τ then counts in units of it)."""
    lengths = stacked.float().norm(dim=-1, keepdim=True)
    if bool((lengths == 0).any()):
        raise BadInputError("a memory's vector is zero, so it cannot be scaled to a norm")
    return (stacked * (norm / lengths)).to(stacked.dtype)


def shard_rows(rows: Sequence[PromptRow], shard: tuple[int, int]) -> list[PromptRow]:
    """Rows ``i, i+n, i+2n, …`` of the dataset for shard ``(i, n)``: shards are disjoint
    and their union is the dataset, and each gets a mix of the file's rows."""
    index, count = shard
    return list(rows[index::count])


def run_sweep(
    model: LoadedModel,
    rows: Sequence[PromptRow],
    config: SweepConfig,
    *,
    registry: Registry | None = None,
    progress: bool = False,
    force_full: bool = False,
    done: pd.DataFrame | None = None,
    checkpoint: Callable[[pd.DataFrame], None] | None = None,
) -> SweepResult:
    """Run the sweep over this shard's rows; see the module docstring for what and how.

    ``force_full`` disables the replay (every cell runs a whole forward pass with the
    injection hook); it exists for benchmarks and for diagnosing an architecture.
    ``done`` holds records of an earlier, interrupted run with the same settings: rows
    whose every cell is there are not computed again. ``checkpoint`` is called after
    each batch with the records of every finished row so far (``done``'s included), so
    an interruption loses at most one batch.
    """
    import numpy as np

    from meminject.plugins import get_registry

    registry = registry or get_registry()
    dims = model.dims
    for layer in config.layers:
        if not 0 <= layer < dims.n_layers:
            raise BadInputError(
                f"layer {layer} is out of range; the model has {dims.n_layers} layers "
                f"(0-{dims.n_layers - 1})"
            )
    for head in config.heads or ():
        if not 0 <= head < dims.n_heads:
            raise BadInputError(
                f"head {head} is out of range; the model has {dims.n_heads} heads "
                f"(0-{dims.n_heads - 1})"
            )
    for encoding in config.encodings:
        encoding_parts(encoding, registry)  # a known encoder with valid parameters
    hook_names = [_injection_hook(model, layer, config.heads) for layer in config.layers]
    missing = [name for name in hook_names if name not in model.bridge.hook_dict]
    if missing:
        raise BadInputError(f"model '{model.name}' has no hook point '{missing[0]}'")

    started = time.perf_counter()
    if config.tau_units == "resid_norm" and config.resid_norms is None:
        # Over every row, not this shard's: shards must scale τ alike to be merged.
        norms = residual_norms(model, rows, config.layers)
        config = dataclasses.replace(config, resid_norms=tuple(sorted(norms.items())))
    norm_of = dict(config.resid_norms or ())
    mine = shard_rows(rows, config.shard)
    previous = _finished_records(done, config) if done is not None else None
    if previous is not None:
        finished_ids = set(previous["row_id"].tolist())
        mine = [row for row in mine if row.row_id not in finished_ids]
    tokenized = [tokenize_row(model, row, config.metric) for row in mine]
    texts = [[row.memory, *control_texts(model, row, config.controls, config.seed)] for row in mine]
    n_var = 1 + config.controls
    n_rows = len(mine)
    heads: list[int | None] = list(config.heads) if config.heads is not None else [None]
    shape = (
        n_rows,
        len(config.layers),
        len(heads),
        len(config.taus),
        len(config.encodings),
        n_var,
    )
    before = np.zeros(n_rows, dtype=np.float64)
    after = np.zeros(shape, dtype=np.float64)
    share = np.full(shape[:3] + shape[4:], np.nan)  # [R, layers, heads, encodings, variants]
    # Similar lengths together: less padding. Results go back to the rows' own slots.
    order = sorted(range(n_rows), key=lambda i: (len(tokenized[i].input_ids), i))
    batches = [order[i : i + config.batch_size] for i in range(0, n_rows, config.batch_size)]
    zero_taus = [t for t in config.taus if t == 0.0]
    passes_per_batch = (
        len(config.layers)
        * len(heads)
        * (len(config.taus) - len(zero_taus))
        * len(config.encodings)
        * n_var
    )
    stats: dict[str, Any] = {
        "rows": n_rows,
        "cells": config.n_cells,
        "base_passes": 0,
        "replays": 0,
        "full_passes": 0,
        "fallback_batches": 0,
        "resumed_rows": 0 if previous is None else previous["row_id"].nunique(),
    }
    finished: list[int] = []
    keep = set(config.layers)
    bridge = model.bridge
    warned = False
    with _progress(progress) as bar:
        task = bar.add_task("sweep", total=len(batches) * passes_per_batch)
        for members in batches:
            batch = _Batch(model, [tokenized[i] for i in members], keep)
            base = batch.base()
            stats["base_passes"] += 1
            before[members] = base.double().cpu().numpy()
            replay = batch.can_replay and not force_full
            if replay:
                try:
                    check = batch.replay(min(keep))
                    replay = float((check - base).abs().max()) <= REPLAY_TOLERANCE
                except Exception:  # an architecture whose blocks cannot be re-entered
                    replay = False
            if not replay:
                stats["fallback_batches"] += int(not force_full)
            if not replay and not force_full and not warned:
                warnings.warn(
                    f"model '{model.name}': re-running layers from ℓ does not reproduce the "
                    "full forward pass; falling back to full passes (correct, but slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                warned = True
            layer_free: dict[str, Tensor] = {}
            for li, layer in enumerate(config.layers):
                # [encoding][variant, batch, d_model], computed before the hook goes in.
                vectors = []
                for encoding in config.encodings:
                    entry = registry.encoders[_parsed_label(encoding)[0]]
                    if (entry.plugin, entry.name) in _LAYER_FREE and encoding in layer_free:
                        vectors.append(layer_free[encoding])
                        continue
                    stacked = _encode_batch(model, texts, members, layer, encoding, registry)
                    if (entry.plugin, entry.name) in _LAYER_FREE:
                        layer_free[encoding] = stacked
                    vectors.append(stacked)
                if config.tau_units == "resid_norm":
                    vectors = [_to_norm(v, norm_of[layer]) for v in vectors]
                adder = _Adder()
                hook = (hook_names[li], adder)
                with bridge.hooks(fwd_hooks=[hook]):
                    for hi, via in enumerate(heads):
                        for ei, stacked in enumerate(vectors):
                            routed = stacked
                            if via is not None:  # what the head can write (meminject.heads)
                                routed = through_head(model, layer, via, stacked)
                                share[members, li, hi, ei] = _shares(routed, stacked).T
                            for ti, tau in enumerate(config.taus):
                                for v in range(n_var):
                                    if tau == 0.0:  # the engine installs no hook for τ = 0
                                        after[members, li, hi, ti, ei, v] = before[members]
                                        continue
                                    adder.delta = tau * routed[v]
                                    if replay:
                                        logp = batch.replay(layer)
                                        stats["replays"] += 1
                                    else:
                                        logp = batch.full()
                                        stats["full_passes"] += 1
                                    adder.delta = None
                                    after[members, li, hi, ti, ei, v] = logp.double().cpu().numpy()
                                    bar.advance(task)
            del batch, layer_free
            finished.extend(members)
            if checkpoint is not None:
                checkpoint(
                    _with_previous(
                        previous,
                        _subset(mine, texts, before, after, share, sorted(finished), config),
                    )
                )
    stats["seconds"] = time.perf_counter() - started
    if norm_of:
        stats["resid_norms"] = norm_of
    records = _with_previous(previous, _records(mine, texts, before, after, share, config))
    return SweepResult(records=records, config=config, stats=stats)


def _subset(
    rows: Sequence[PromptRow],
    texts: Sequence[Sequence[str]],
    before: np.ndarray,
    after: np.ndarray,
    share: np.ndarray,
    index: list[int],
    config: SweepConfig,
) -> pd.DataFrame:
    return _records(
        [rows[i] for i in index],
        [texts[i] for i in index],
        before[index],
        after[index],
        share[index],
        config,
    )


def _with_previous(previous: pd.DataFrame | None, records: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    if previous is None or previous.empty:
        return records
    merged = pd.concat([previous, records], ignore_index=True)
    for column in ("encoding", "kind"):
        merged[column] = merged[column].astype("category")
    return merged


def _listed(values: set[Any]) -> str:
    """Numbers in numeric order (τ 2 before 10), anything else by its text."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return str(sorted(values) if numbers else sorted(values, key=str))


def _finished_records(done: pd.DataFrame, config: SweepConfig) -> pd.DataFrame:
    """The rows of an earlier run that are complete, after checking it used these settings."""
    expected: dict[str, set[Any]] = {
        "layer": set(config.layers),
        "tau": {float(t) for t in config.taus},
        "encoding": set(config.encodings),
        "metric": {config.metric},
    }
    if "site" in done.columns or config.heads is not None:
        # Records written before heads were routed through W_O had no site column; their
        # head cells were attention-output additions, not these.
        expected["site"] = {"attn_out" if config.heads is None else "attn_z"}
        if "site" not in done.columns:
            done = done.assign(site="attn_out")
    if "tau_units" in done.columns or config.tau_units != "absolute":
        # Records written before τ units existed are absolute.
        expected["tau_units"] = {config.tau_units}
        if "tau_units" not in done.columns:
            done = done.assign(tau_units="absolute")
    for column, values in expected.items():
        found = {v.item() if hasattr(v, "item") else v for v in done[column].unique()}
        if column == "tau":
            found = {float(v) for v in found}
        if done.empty or found != values:
            raise BadInputError(
                f"the partial results were made with other settings ({column}: "
                f"{_listed(found)} instead of {_listed(values)}); pass --force instead of "
                "--resume to discard them and start again"
            )
    heads = len(config.heads) if config.heads is not None else 1
    per_row = (
        len(config.layers)
        * heads
        * len(config.taus)
        * len(config.encodings)
        * (1 + config.controls)
    )
    counts = done.groupby("row_id").size()
    complete = counts[counts == per_row].index
    return done[done["row_id"].isin(complete)].reset_index(drop=True)


def partial_path(out: Path) -> Path:
    """Where a sweep that writes ``out`` keeps the rows it has finished while it runs."""
    return out.with_name(f"{out.stem}.partial{out.suffix}")


# --------------------------------------------------------------------------- reference


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
) -> tuple[float, float]:
    """The plain loop: ``(p_before, p_after)`` for one prompt and one cell, from two
    ordinary forward passes, the second inside :func:`meminject.engine.inject` with the
    cell's :class:`AddMemory` (``memory_text`` replaces the row's memory, for controls).
    With a ``head`` it is a memory routed through that head (site ``attn_z``), compiled
    as in a file."""
    import torch

    from meminject.engine import inject
    from meminject.memfile import LoadedFile, MemoryEntry, MemorySet

    tokenized = tokenize_row(model, row, metric)
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


# --------------------------------------------------------------------------- output


def check_output_path(path: Path, force: bool) -> None:
    """Fail before hours of compute, not after: known suffix, and no silent overwrite."""
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise BadInputError(f"{path}: unknown output format; use .csv or .parquet")
    if path.exists() and not force:
        raise BadInputError(f"{path} exists; pass --force to overwrite it")


def write_records(records: pd.DataFrame, path: Path | str, *, force: bool = False) -> None:
    """Write tidy records as CSV or Parquet (by suffix), atomically."""
    from meminject.atomic import write_bytes_atomic

    path = Path(path)
    check_output_path(path, force)
    buffer = io.BytesIO()
    if path.suffix.lower() == ".csv":
        records.to_csv(buffer, index=False)
    else:
        records.to_parquet(buffer, index=False)
    write_bytes_atomic(path, buffer.getvalue(), overwrite=force)


def read_records(path: Path | str) -> pd.DataFrame:
    """Read records written by :func:`write_records` (e.g. to merge shards)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        # A memory text such as "NA", "null" or "" is the text injected, never a missing
        # value; in every other column an empty field is one (no head, no control, no
        # head share, absolute τ, and any column added later).
        columns = pd.read_csv(path, nrows=0).columns
        empty = {c: [""] for c in columns if c != "memory"}
        frame = pd.read_csv(path, keep_default_na=False, na_values=empty)
    else:
        frame = pd.read_parquet(path)
    frame["head"] = frame["head"].astype("Int64")
    frame["control"] = frame["control"].astype("Int64")
    return frame


#: Statistics a heatmap can show: summary column → colour-bar label.
PLOT_STATS = sweep_stats.RANK_STATS


def plot_heatmap(
    summary: pd.DataFrame,
    path: Path | str,
    *,
    stat: str = sweep_stats.DEFAULT_RANK,
    title: str = "",
    force: bool = False,
) -> None:
    """Layers × τ heatmaps of a per-cell statistic (default: the median gain, see
    :mod:`meminject.sweep_stats`), one panel per encoding, plus a row for the controls
    when the statistic has a control counterpart (the paper's percentages and shares)
    and controls were run; written atomically as PNG. A head sweep gets one row per
    (layer, head): heads are routed through their own output projection and differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from matplotlib.colors import Normalize, SymLogNorm

    from meminject.atomic import write_bytes_atomic
    from meminject.plots import heatmap_panel, png_bytes

    if stat not in PLOT_STATS:
        raise BadInputError(f"unknown plot statistic '{stat}'; choose {', '.join(PLOT_STATS)}")
    path = Path(path)
    if path.exists() and not force:
        raise BadInputError(f"{path} exists; pass --force to overwrite it")
    if summary.empty:
        raise BadInputError("nothing to plot: the sweep has no rows")
    encodings = list(dict.fromkeys(summary["encoding"].astype(str)))
    has_controls = bool(summary["control_n"].max() > 0)
    control_stat = f"control_{stat}"
    kinds = [(stat, "memory")]
    if has_controls and control_stat in summary:
        kinds.append((control_stat, "control"))
    taus = sorted(summary["tau"].unique())
    per_head = "head" in summary and bool(summary["head"].notna().any())
    if per_head:
        summary = summary.assign(head=summary["head"].astype("Int64"))
        keys = ["layer", "head"]
        rows = sorted({(int(a), int(b)) for a, b in summary[keys].itertuples(index=False)})
        index: Any = pd.MultiIndex.from_tuples(rows, names=keys)
        yticks, ylabel = [f"{layer}·h{head}" for layer, head in rows], "layer · head"
    else:
        keys = ["layer"]
        index = sorted(summary["layer"].unique())
        yticks, ylabel = [str(layer) for layer in index], "layer"
    grids: dict[tuple[str, str], np.ndarray] = {}
    for column, kind in kinds:
        for encoding in encodings:
            part = summary[summary["encoding"].astype(str) == encoding]
            table = part.groupby([*keys, "tau"])[column].mean().unstack("tau")
            grids[(kind, encoding)] = table.reindex(index=index, columns=taus).to_numpy(float)
    values = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    norm: Normalize
    if stat.startswith("share_"):
        norm, fmt = Normalize(vmin=0.0, vmax=1.0), "{:.0%}"  # white at one half
    elif stat in ("median_gain", "median_effect", "median_lift", "mean_dp"):
        span = float(np.abs(values).max()) if values.size else 1.0
        span = span if span > 0 else 1.0
        norm, fmt = Normalize(vmin=-span, vmax=span), "{:+.2f}"  # white at zero
    else:
        # Percent changes run from -100 to the thousands when a base probability is
        # tiny: a symmetric log scale around 0 keeps losses and gains readable.
        span = max(float(np.abs(values).max()) if values.size else 1.0, 1.0)
        norm, fmt = SymLogNorm(linthresh=10.0, linscale=1.0, vmin=-span, vmax=span), "{:.0f}"
    n_rows, n_cols = len(kinds), len(encodings)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(
            1.2 + max(3.0, 0.42 * len(taus)) * n_cols,
            0.8 + max(2.2, 0.32 * len(yticks)) * n_rows,
        ),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for r, (_, kind) in enumerate(kinds):
        for c, encoding in enumerate(encodings):
            ax = axes[r][c]
            grid = grids[(kind, encoding)]
            image = heatmap_panel(
                ax,
                grid,
                xticks=[f"{t:g}" for t in taus],
                yticks=yticks,
                xlabel="τ",
                ylabel=ylabel,
                title=f"{encoding} · {kind}",
                cmap="RdBu_r",
                norm=norm,
                fmt=fmt,
                annotate_up_to=300,
            )
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=sweep_stats.SHORT_LABELS[stat])
    if title:
        import textwrap

        # Wrapped to the figure's width (about 11 characters per inch at this size), so a
        # long dataset name is not cut off at the edges.
        width = max(20, int(fig.get_figwidth() * 11))
        fig.suptitle("\n".join(textwrap.wrap(title, width)), fontsize=10)
    write_bytes_atomic(path, png_bytes(fig, dpi=90), overwrite=force)
