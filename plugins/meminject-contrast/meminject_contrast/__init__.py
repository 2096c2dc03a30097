"""The ``contrast`` encoder: a steering vector from a pair of texts.

``v = act(text) − act(negative)``: both texts are run through the model and the
activation at the memory's layer is read at one hook point; their difference is the
vector the memory's strategy adds (with ``strategy = "add"``, ``τ·v``). This is
activation addition (Turner et al., "Activation Addition: Steering Language Models
Without Optimization", arXiv 2308.10248) and its contrastive form (Rimsky et al.,
arXiv 2312.06681), written as a meminject memory.

Why a difference and not one text's activation (what the built-in ``layer`` encoder
gives): a single activation carries everything the model computes for that text —
position, syntax, frequent-token directions — and most of it is shared with any other
text. Subtracting a matched negative ("Love" vs "Hate") cancels what the two share
and leaves the direction that tells them apart.

The module imports no torch at import time, so ``meminject plugins``, ``validate`` and
``schema`` stay light with this plugin installed; the parameter model is plain pydantic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from meminject import hookimpl
from meminject.errors import BadInputError
from meminject.sites import hook_name as site_hook_name

if TYPE_CHECKING:
    from torch import Tensor

    from meminject.extension import EncodeRequest

__all__ = ["ContrastParams", "encode_contrast", "register_encoders"]

__version__ = "0.1.0"

Activation = Literal["attn_out", "mlp_out", "resid_pre", "resid_mid", "resid_post"]


class ContrastParams(BaseModel):
    """The ``[memory.params]`` table of a memory with ``encoding = "contrast"``."""

    # Same rules as the rest of a memory file: a typo or a quoted number is an error,
    # not a silently ignored key or a coerced value.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    negative: str = Field(
        ...,
        min_length=1,
        max_length=10_000,
        description="The text whose activation is subtracted from the memory's text's.",
    )
    activation: Activation = Field(
        "resid_pre",
        description="Hook point of the memory's layer the activations are read at. Give the "
        "memory the same site to add the vector where it was measured.",
    )
    position: Literal["last", "mean"] = Field(
        "mean",
        description="Read each text's activation at its last token, or average it over the "
        "text's tokens (BOS excluded). 'mean' suits texts of different lengths.",
    )
    normalize: bool = Field(
        False,
        description="Scale v to unit length, so τ alone sets the injected vector's norm.",
    )


def _read(request: EncodeRequest, text: str, params: ContrastParams) -> Tensor:
    """One text's activation at the memory's layer, reduced over positions."""
    import torch

    model = request.model
    ids = model.tokenize(text)
    skip = 1 if model.prepend_bos else 0  # BOS is an attention sink, not part of the text
    if len(ids) <= skip:
        raise BadInputError(f"the text {text!r} encodes to no tokens")
    if len(ids) > model.dims.n_ctx:
        raise BadInputError(
            f"the text is {len(ids)} tokens, longer than the model's context of {model.dims.n_ctx}"
        )
    hook_name = site_hook_name(params.activation, request.layer)
    if hook_name not in model.bridge.hook_dict:
        raise BadInputError(f"model '{model.name}' has no hook point '{hook_name}'")
    captured: dict[str, Tensor] = {}

    def capture(activation: Tensor, hook: Any) -> None:
        captured["a"] = activation[0, skip:].detach().to(torch.float32)

    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    with torch.no_grad():
        # Nothing after the layer is needed, so the forward stops there.
        model.bridge.run_with_hooks(
            tokens, fwd_hooks=[(hook_name, capture)], stop_at_layer=request.layer + 1
        )
    acts = captured["a"]
    return acts[-1] if params.position == "last" else acts.mean(dim=0)


def encode_contrast(request: EncodeRequest) -> Tensor:
    """v = act(text) − act(negative) at the memory's layer (activation addition)."""
    params = request.params
    if not isinstance(params, ContrastParams):  # the registry validated [memory.params]
        raise BadInputError("the contrast encoder needs [memory.params] with 'negative'")
    vector = _read(request, request.text, params) - _read(request, params.negative, params)
    norm = float(vector.norm())
    if norm == 0.0:
        raise BadInputError(
            "the text and params.negative give the same activation, so the vector is zero"
        )
    if params.normalize:
        vector = vector / norm
    return vector.to(request.model.dtype)


@hookimpl
def register_encoders(register: Any) -> None:
    register("contrast", encode_contrast, params_model=ContrastParams)
