"""Built-in encoders (docs/architecture.md#encoders), registered as plugins' encoders are.

Text is tokenized without BOS, and ``embed``/``unembed`` count each distinct token
once: the paper builds a multi-hot vector over the vocabulary, so a repeated token
does not weigh double. ``layer`` runs the text as the model sees a prompt (BOS
prepended when the model prepends one), so the vector is an activation the model
actually produces, read at the text's last token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError, ContextTooLongError
from meminject.hookspecs import hookimpl
from meminject.sites import hook_name as site_hook_name

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
        return request.model.unembed_columns(_tokens(request)).sum(dim=-1)


def encode_embed(request: EncodeRequest) -> Float[Tensor, " d_model"]:
    """v = Σ W_E[t] over the text's distinct tokens."""
    import torch

    with torch.no_grad():
        w_e = request.model.W_E
        return w_e[_tokens(request)].float().sum(dim=0)


def encode_layer(request: EncodeRequest) -> Float[Tensor, " d_model"]:
    """v = attention output of layer ℓ at the text's last token, read where the memory
    will be added: a memory routed through a head is added to the heads' sum, which in
    blocks that normalise the attention output (Gemma 2/3) lies before that norm, so it
    is read there too. Read after the norm and added before it, the vector had the
    normalised output's scale in the un-normalised space, and the norm undid τ."""
    import torch

    from meminject.sites import heads_sum_site

    model = request.model
    site = "attn_out"
    if getattr(request.memory, "head", None) is not None:
        site = heads_sum_site(model.post_sublayer_norms).name
    ids = model.tokenize(request.text)
    if len(ids) > model.dims.n_ctx:
        raise ContextTooLongError(
            f"the text is {len(ids)} tokens, longer than the model's context of {model.dims.n_ctx}"
        )
    hook_name = site_hook_name(site, request.layer)
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    with torch.no_grad():
        activation = capture_activation(model, tokens, hook_name, request.layer)
    return activation[0, -1].detach().float()


class _Captured(Exception):
    """Raised by a capturing hook to stop the forward once the activation is read."""


def capture_activation(
    model: Any, tokens: Tensor, hook_name: str, layer: int
) -> Float[Tensor, "1 pos d_model"]:
    """The activation at ``hook_name`` (bridge coordinates) when ``model`` reads
    ``tokens``, running no further than ``layer``: through the bridge when the model has
    one, else through the served plain model and its verified site map."""
    captured: dict[str, Tensor] = {}
    if model.has_bridge:

        def keep(activation: Tensor, hook: Any) -> None:
            captured["v"] = activation

        model.bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, keep)], stop_at_layer=layer + 1)
        return captured["v"]
    from meminject.backends import Step, get_backend

    backend = get_backend(model, "hf")

    def stop(activation: Tensor) -> Tensor:
        captured["v"] = activation
        raise _Captured

    try:
        with backend.hooks({hook_name: stop}):
            backend.forward(Step(tokens, use_cache=False))
    except _Captured:
        pass
    return captured["v"]


@hookimpl
def register_encoders(register: Any) -> None:
    register("unembed", encode_unembed)
    register("embed", encode_embed)
    register("layer", encode_layer)
