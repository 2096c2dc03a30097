"""The paper's "head latent space projector": what each layer's attention, and each head,
writes at the last position, read through the unembedding.

For a prompt, the vector an attention layer adds to the residual stream at the last
position (``blocks.ℓ.hook_attn_out``), or one head's share of it
(``blocks.ℓ.attn.hook_result``), is multiplied by ``W_U``; the largest entries are the
tokens that component pushes the prediction towards. This is how the paper found that
on failed multi-hop prompts the bridge entity is missing from the heads' outputs, and
where a memory could be injected.

Choices, stated because they change numbers:

* **No final LayerNorm, no unembedding bias.** The paper projects with ``W_U`` alone, in
  the processed coordinates of ``HookedTransformer``; so do we (with the model's
  coordinates: processed by default, raw with ``--coordinates raw``). The bias is not
  part of what a head writes. In processed coordinates ``W_U`` is centred over
  ``d_model`` and ``ln_final`` only centres and rescales its input, so applying it would
  rescale every logit of a vector by one positive number and change no rank and no
  top-k; in raw coordinates it would, and we still leave it out, to stay with the paper.
* **The last position** is the prompt's last token, BOS included in the count when the
  model prepends one.
* **Ranks are 1-based**: rank 1 is the top token.

``--heads`` needs per-head results, which the bridge computes only with
``use_attn_result``; the flag is switched on for the pass and restored afterwards, also
when the pass fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError
from meminject.model_handle import continuation
from meminject.sites import hook_name

if TYPE_CHECKING:
    import numpy as np
    from jaxtyping import Float
    from torch import Tensor

    from meminject.model_handle import LoadedModel


@dataclass(frozen=True)
class TokenScore:
    token: str
    token_id: int
    logit: float


@dataclass(frozen=True)
class Projection:
    """One component's write at the last position, projected onto the vocabulary."""

    layer: int
    head: int | None  # None: the layer's whole attention output
    top: list[TokenScore]
    rank: int | None = None  # of the watched token, 1 = top
    logit: float | None = None  # of the watched token


@dataclass(frozen=True)
class LensReport:
    prompt: str
    position: int
    last_token: str
    token: str | None
    token_id: int | None
    heads: bool
    projections: list[Projection]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rank_grid(self) -> tuple[list[int], list[str], np.ndarray]:
        """Ranks of the watched token as ``layers × [attn_out, head 0, head 1, …]``."""
        import numpy as np

        if self.token_id is None:
            raise BadInputError("no token was given to rank (--token)")
        layers = sorted({p.layer for p in self.projections})
        heads = sorted({p.head for p in self.projections if p.head is not None})
        columns = ["attn", *[f"h{h}" for h in heads]]
        grid = np.full((len(layers), len(columns)), np.nan)
        for p in self.projections:
            column = 0 if p.head is None else 1 + heads.index(p.head)
            grid[layers.index(p.layer), column] = float(p.rank) if p.rank is not None else np.nan
        return layers, columns, grid


def token_id_for(model: LoadedModel, token: str) -> int:
    """The id of ``token`` as it follows the prompt (``LoadedModel.continuation_ids``:
    'Paris' means ' Paris'), which must be exactly one token."""
    ids = model.continuation_ids(token, "--token")
    if len(ids) != 1:
        pieces = [model.token_str(i) for i in ids]
        raise BadInputError(
            f"--token {token!r} is {len(ids)} tokens {pieces!r}; give a single token"
        )
    return ids[0]


def project(
    vectors: Float[Tensor, "n d_model"], w_u: Float[Tensor, "d_model d_vocab"]
) -> Float[Tensor, "n d_vocab"]:
    """The head latent space projector: ``x · W_U`` (no final norm, no bias)."""
    return vectors.float() @ w_u.float()


def project_attention(
    model: LoadedModel,
    prompt: str,
    *,
    layers: Sequence[int] | None = None,
    heads: bool = False,
    top_k: int = 10,
    token: str | None = None,
) -> LensReport:
    """Project each chosen layer's attention output (and, with ``heads``, each head's
    result) at the prompt's last position onto the vocabulary."""
    import torch

    dims = model.dims
    chosen = list(range(dims.n_layers)) if layers is None else list(layers)
    for layer in chosen:
        if not 0 <= layer < dims.n_layers:
            raise BadInputError(
                f"layer {layer} is out of range; the model has {dims.n_layers} layers "
                f"(0-{dims.n_layers - 1})"
            )
    if top_k < 0:
        raise BadInputError("--show-top must be >= 0")
    if heads and model.post_sublayer_norms:
        raise BadInputError(
            f"--heads is not supported on model '{model.name}': its blocks normalise the "
            "attention output before the residual stream, so a head's result is not a "
            "summand of what the layer writes and its projection would not be comparable"
        )
    token_id = token_id_for(model, token) if token is not None else None
    tokens = model.to_tokens(prompt)
    names = [hook_name("attn_out", layer) for layer in chosen]
    if heads:
        names += [hook_name("attn_result", layer) for layer in chosen]
    wanted = set(names)
    bridge = model.bridge
    had_result = bool(getattr(bridge.cfg, "use_attn_result", False))
    if heads and not had_result:
        bridge.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    finally:
        if heads and not had_result:
            bridge.set_use_attn_result(False)
    with torch.no_grad():
        w_u = bridge.W_U.detach()
        rows: list[tuple[int, int | None]] = []
        vectors = []
        for layer in chosen:
            rows.append((layer, None))
            vectors.append(cache[hook_name("attn_out", layer)][0, -1])
            if heads:
                result = cache[hook_name("attn_result", layer)][0, -1]  # [head, d_model]
                for h in range(result.shape[0]):
                    rows.append((layer, h))
                    vectors.append(result[h])
        logits = project(torch.stack(vectors), w_u)
        k = min(top_k, logits.shape[-1])
        values, ids = logits.topk(k, dim=-1) if k else (logits[:, :0], logits[:, :0].long())
        if token_id is not None:
            watched = logits[:, token_id]
            ranks = (logits > watched[:, None]).sum(-1) + 1
    projections = []
    for i, (layer, head_index) in enumerate(rows):
        top = [
            TokenScore(model.token_str(int(t)), int(t), float(v))
            for v, t in zip(values[i].tolist(), ids[i].tolist(), strict=True)
        ]
        projections.append(
            Projection(
                layer,
                head_index,
                top,
                rank=int(ranks[i]) if token_id is not None else None,
                logit=float(watched[i]) if token_id is not None else None,
            )
        )
    return LensReport(
        prompt=prompt,
        position=int(tokens.shape[1] - 1),
        last_token=model.token_str(int(tokens[0, -1])),
        token=continuation(token) if token is not None else None,  # as it was ranked
        token_id=token_id,
        heads=heads,
        projections=projections,
    )


def plot_ranks(report: LensReport, path: Path | str, *, force: bool = False) -> None:
    """Heatmap of the watched token's rank, layers × (attention output, heads), as PNG.
    Colour is log-scaled: the interesting ranks are the small ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    from meminject.atomic import write_bytes_atomic
    from meminject.plots import heatmap_panel, png_bytes

    path = Path(path)
    if path.exists() and not force:
        raise BadInputError(f"{path} exists; pass --force to overwrite it")
    layers, columns, grid = report.rank_grid()
    vmax = max(float(np.nanmax(grid)), 2.0)
    fig, ax = plt.subplots(
        figsize=(max(4.5, 2.0 + 0.62 * len(columns)), max(3.4, 1.4 + 0.42 * len(layers))),
        constrained_layout=True,
    )
    image = heatmap_panel(
        ax,
        grid,
        xticks=columns,
        yticks=[str(layer) for layer in layers],
        xlabel="attention output / head",
        ylabel="layer",
        title=f"rank of {report.token!r} at the last position",
        cmap="viridis_r",
        norm=LogNorm(1, vmax),
        fmt="{:.0f}",
        annotate_up_to=400,
    )
    fig.colorbar(image, ax=ax, label="rank (1 = top)")
    write_bytes_atomic(path, png_bytes(fig, dpi=130), overwrite=force)
