"""Built-in encoders (DESIGN §4), registered through the same hook as plugins' encoders.

Text is tokenized without BOS, and ``embed``/``unembed`` count each distinct token
once: the paper builds a multi-hot vector over the vocabulary, so a repeated token
does not weigh double. ``layer`` runs the text as the model sees a prompt (BOS
prepended when the model prepends one), so the vector is an activation the model
actually produces, read at the text's last token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError
from meminject.hookspecs import hookimpl

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from meminject.extension import EncodeRequest


def _tokens(request: EncodeRequest) -> list[int]:
    tokens = request.distinct_tokens()
    if not tokens:
        raise BadInputError("the memory's text encodes to no tokens")
    return tokens


def encode_unembed(request: EncodeRequest) -> Float[Tensor, " d_model"]:
    """v = Σ W_U[:, t] over the text's distinct tokens."""
    import torch

    with torch.no_grad():
        w_u = request.model.bridge.W_U
        return w_u[:, _tokens(request)].sum(dim=-1).detach().clone()


def encode_embed(request: EncodeRequest) -> Float[Tensor, " d_model"]:
    """v = Σ W_E[t] over the text's distinct tokens."""
    import torch

    with torch.no_grad():
        w_e = request.model.bridge.W_E
        return w_e[_tokens(request)].sum(dim=0).detach().clone()


def encode_layer(request: EncodeRequest) -> Float[Tensor, " d_model"]:
    """v = attention output of layer ℓ at the text's last token."""
    import torch

    model = request.model
    ids = model.tokenize(request.text)
    if len(ids) > model.dims.n_ctx:
        raise BadInputError(
            f"the text is {len(ids)} tokens, longer than the model's context of {model.dims.n_ctx}"
        )
    hook_name = f"blocks.{request.layer}.hook_attn_out"
    captured: dict[str, Any] = {}

    def capture(activation: Tensor, hook: Any) -> None:
        captured["v"] = activation[0, -1].detach().clone()

    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    with torch.no_grad():
        model.bridge.run_with_hooks(
            tokens, fwd_hooks=[(hook_name, capture)], stop_at_layer=request.layer + 1
        )
    vector: Tensor = captured["v"]
    return vector


@hookimpl
def register_encoders(register: Any) -> None:
    register("unembed", encode_unembed)
    register("embed", encode_embed)
    register("layer", encode_layer)
