"""The fast path's machinery: a right-padded batch's base pass and its replays from a
layer (:class:`Batch`), the hook that adds one vector per row (:class:`Adder`), the
hook point a cell's vector goes in, vectors rescaled to a norm or measured against what
a head can write, and the residual-stream norms τ can be counted in. Why a replay is
exact: :mod:`meminject.sweep`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError
from meminject.sites import heads_sum_site, hook_name

if TYPE_CHECKING:
    import numpy as np
    from jaxtyping import Float, Int
    from torch import Tensor

    from meminject.datasets import PromptRow
    from meminject.model_handle import LoadedModel
    from meminject.sweep.rows import TokenizedRow


#: Largest difference in log-probability between the replayed and the full forward
#: pass that still counts as "the replay reproduces the model" (float32 noise is ~1e-6).
REPLAY_TOLERANCE = 1e-4


def _strip_cache(value: Any) -> Any:
    """Drop the KV cache the bridge threads through the blocks: a replay must not append
    to it (the blocks would then attend to the base pass's keys as well)."""
    from transformers.cache_utils import Cache

    return None if isinstance(value, Cache) else value


def _log_probs(
    logits: Float[Tensor, "batch n_read d_vocab"],
    targets: Int[Tensor, "batch n_read"],
    valid: Float[Tensor, "batch n_read"],
) -> tuple[Float[Tensor, " batch"], Int[Tensor, " batch"]]:
    """The answer's log-probability, and the rank of its first token among the next
    tokens after the prompt (1: the model's top choice; ties counted in its favour)."""
    logits = logits.float()
    logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    first = logits[:, 0]
    rank = (first > first.gather(-1, targets[:, :1])).sum(-1) + 1
    return (logp * valid).sum(-1), rank


class Batch:
    """One right-padded batch of rows: the base pass, then replays from any layer."""

    def __init__(self, model: LoadedModel, rows: Sequence[TokenizedRow], keep: set[int]) -> None:
        import torch

        self.model = model
        self.bridge = model.bridge
        self.size = len(rows)
        width = max(len(r.input_ids) for r in rows)
        n_read = max(len(r.targets) for r in rows)
        pad = model.pad_token_id
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
        #: The rank of each row's answer (first token) in the last pass scored.
        self.rank: Int[Tensor, " batch"] | None = None
        self.inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

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
        logp, self.rank = _log_probs(logits.gather(1, index), self.targets, self.valid)
        return logp

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
        logp, self.rank = _log_probs(logits, self.targets, self.valid)
        return logp

    def full(self) -> Float[Tensor, " batch"]:
        """A whole forward pass (the fallback; hooks installed on the bridge fire)."""
        import torch

        with torch.no_grad():
            return self._score(self.bridge(self.tokens))


class Adder:
    """The ``add`` strategy's body with one vector per batch row: ``a ← a + δ_row`` at
    every position, or where ``mask`` is 1. ``delta`` is set before each pass; None
    leaves the activation as is."""

    def __init__(self, mask: Float[Tensor, "batch pos"] | None = None) -> None:
        self.delta: Tensor | None = None
        self.mask = mask

    def __call__(self, activation: Float[Tensor, "batch pos d_model"], hook: Any) -> Any:
        if self.delta is None:
            return activation
        delta = self.delta[:, None, :].to(activation.dtype)
        if self.mask is not None:
            delta = delta * self.mask[:, : activation.shape[1], None].to(activation.dtype)
        return activation + delta


def position_mask(batch: Batch, rows: Sequence[TokenizedRow], positions: str) -> Tensor | None:
    """Where a cell adds its vector in this batch (``SweepConfig.positions``): None for
    every position; else 1 at the prompt's last token of each row (``last``), or
    everywhere but position 0 (``not-bos``)."""
    import torch

    if positions == "all":
        return None
    mask = torch.zeros(batch.tokens.shape, dtype=torch.float32, device=batch.tokens.device)
    if positions == "last":
        for i, row in enumerate(rows):
            mask[i, row.read_positions[0]] = 1.0
    else:
        mask[:, 1:] = 1.0
    return mask


def injection_hook(model: LoadedModel, layer: int, heads: Sequence[int] | None) -> str:
    """Where a cell's vector is added: the attention output, or, for a vector routed
    through a head in a block that normalises the attention output (Gemma 2/3), the
    attention's own output before that norm: the same lowering as the engine's."""
    if heads is not None:
        return hook_name(heads_sum_site(model.post_sublayer_norms).name, layer)
    return hook_name("attn_out", layer)


def head_shares(
    routed: Float[Tensor, "variant batch d_model"], stacked: Float[Tensor, "variant batch d_model"]
) -> np.ndarray:
    """‖v·P_h‖ / ‖v‖ per variant and row."""
    full = stacked.float().norm(dim=-1)
    part = routed.float().norm(dim=-1)
    return (part / full.clamp_min(1e-30)).double().cpu().numpy()


def to_norm(
    stacked: Float[Tensor, "variant batch d_model"], norm: float
) -> Float[Tensor, "variant batch d_model"]:
    """Every vector rescaled to length ``norm`` (τ then counts in units of it)."""
    lengths = stacked.float().norm(dim=-1, keepdim=True)
    if bool((lengths == 0).any()):
        raise BadInputError("a memory's vector is zero, so it cannot be scaled to a norm")
    return (stacked * (norm / lengths)).to(stacked.dtype)


def controls_at_memory_length(
    stacked: Float[Tensor, "variant batch d_model"], first: int
) -> Float[Tensor, "variant batch d_model"]:
    """Variants ``first``… (the controls) rescaled, row by row, to the length of variant
    0 (the row's memory): a control then tests the memory's direction, not its size."""
    if first >= stacked.shape[0]:
        return stacked
    out = stacked.clone()
    target = stacked[0].float().norm(dim=-1, keepdim=True)
    lengths = stacked[first:].float().norm(dim=-1, keepdim=True)
    if bool((lengths == 0).any()):
        raise BadInputError("a control's vector is zero, so it cannot be scaled to a norm")
    out[first:] = (stacked[first:] * (target / lengths)).to(stacked.dtype)
    return out


def residual_norms(
    model: LoadedModel, rows: Sequence[PromptRow], layers: Sequence[int]
) -> dict[int, float]:
    """Each layer's typical residual-stream norm: the mean of ‖resid_pre(ℓ)‖ over the
    rows' prompt tokens but the first, in the model's loaded coordinates. What
    ``--tau-units resid_norm`` measures τ in. Position 0 is left out whether it is BOS or
    the prompt's first token (models without BOS): attention uses it as a sink, and its
    norm is an outlier many times the others, which would set τ's unit by one token."""
    import torch

    sums = dict.fromkeys(layers, 0.0)
    count = 0
    skip = 1
    hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = []
    captured: dict[int, Tensor] = {}
    for layer in layers:

        def capture(activation: Tensor, hook: Any, layer: int = layer) -> None:
            captured[layer] = activation[0, skip:].float().norm(dim=-1)

        hooks.append((hook_name("resid_pre", layer), capture))
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
