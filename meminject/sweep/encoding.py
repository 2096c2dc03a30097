"""Encoding labels and the memories of a sweep's cells: the encoder and parameters a
label stands for, its one spelling, the :class:`~meminject.schema.AddMemory` a cell
stands for, and the vectors of its texts from the registered encoder
(:func:`encode_text`, the one path by which the fast sweep encodes a text)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError
from meminject.pydantic_errors import describe, field_path, first_error
from meminject.schema import AddMemory

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from meminject.model_handle import LoadedModel
    from meminject.plugins import Registry


def encoding_parts(label: str, registry: Registry | None = None) -> tuple[str, Any]:
    """The encoder name and validated parameters an encoding label stands for.

    A label is a registered encoder's name (``unembed``), optionally followed by its
    ``[memory.params]`` as a TOML inline table: ``pooled{reduce = "max"}``. Parameters
    not given take the encoder's defaults. Errors name the label and the parameter."""
    from pydantic import ValidationError

    from meminject.plugins import get_registry

    registry = registry or get_registry()
    name, given = parsed_label(label)
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
        error = first_error(exc.errors())
        message = describe(error, known=params_model.model_fields, owner=f"encoder '{name}'")
        raise BadInputError(
            f"encoding '{label}': parameter '{field_path(error['loc'])}': {message}"
        ) from None


@functools.lru_cache(maxsize=256)
def parsed_label(label: str) -> tuple[str, dict[str, Any]]:
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
    from meminject.memfile_writer import toml_value

    encoding_parts(label, registry)  # valid, or a clear error
    name, given = parsed_label(label)
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
    given = dict(parsed_label(encoding)[1])
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
    model: LoadedModel,
    text: str,
    *,
    layer: int,
    encoding: str,
    registry: Registry | None = None,
    head: int | None = None,
) -> Float[Tensor, " d_model"]:
    """``v`` for ``text`` from the registered encoder, exactly as the engine computes it
    (for a memory routed through ``head`` when given: an encoder may read it elsewhere,
    as ``layer`` does on Gemma; which head does not matter to the built-in ones)."""
    from meminject.engine import run_encoder
    from meminject.plugins import get_registry

    registry = registry or get_registry()
    memory = sweep_memory(
        text, layer=layer, tau=1.0, encoding=encoding, head=head, registry=registry
    )
    vector = run_encoder(
        model, memory, registry, subject=repr(text), where=f"the sweep's text {text!r}"
    )
    return vector.detach().to(device=model.device, dtype=model.dtype)


#: Built-in encoders whose vector does not depend on the layer; computed once per text.
LAYER_FREE = {
    ("meminject.default_plugins.encoders", "unembed"),
    ("meminject.default_plugins.encoders", "embed"),
}


def encode_batch(
    model: LoadedModel,
    texts: Sequence[Sequence[str]],
    members: Sequence[int],
    layer: int,
    encoding: str,
    registry: Registry,
    head: int | None = None,
) -> Float[Tensor, "variant batch d_model"]:
    """The vectors of every row's memory (variant 0) and the other variants in a batch
    (``head``: encoded for a memory routed through a head, see :func:`encode_text`)."""
    import torch

    n_var = len(texts[members[0]])
    return torch.stack(
        [
            torch.stack(
                [
                    encode_text(
                        model,
                        texts[i][v],
                        layer=layer,
                        encoding=encoding,
                        registry=registry,
                        head=head,
                    )
                    for i in members
                ]
            )
            for v in range(n_var)
        ]
    )
