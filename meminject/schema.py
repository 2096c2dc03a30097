"""Pydantic models of the memory file format (docs/memory-files.md).

The file-level model is not static: which strategies exist, and which encoders
take a parameter table, is only known once plugins are loaded. The static pieces
live here; :func:`build_file_model` assembles the discriminated union from what
is registered. Nothing here imports torch, so ``meminject validate`` stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from meminject.pydantic_errors import describe, field_path, first_error
from meminject.sites import SITES

FORMAT_VERSION = 1

#: Site name → TransformerLens hook point, from :mod:`meminject.sites` (which owns them;
#: kept here for plugins written against it). The Literals below must list the same
#: sites; a test holds them to the table.
SITE_HOOKS: dict[str, str] = {name: info.hook for name, info in SITES.items()}

Site = Literal[
    "attn_result",
    "attn_out",
    "attn_z",
    "mlp_post",
    "mlp_out",
    "resid_pre",
    "resid_mid",
    "resid_post",
]
TextSite = Literal[
    "attn_result", "attn_out", "attn_z", "resid_pre", "resid_mid", "resid_post", "mlp_out"
]
PositionMode = Literal["all", "prompt", "generated", "last"]
Coordinates = Literal["processed", "raw"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class FieldValueError(ValueError):
    """A model-level validator's error that belongs to one field (for error locations)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class StrictModel(BaseModel):
    """Unknown keys are errors and values are not coerced across types (``enabled = "no"``
    is not False): a mistake in a memory file must not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False, strict=True)


class ModelInfo(StrictModel):
    """The ``[model]`` table: what the memories were made for."""

    name: str | None = Field(None, description="Model name or alias; the default --model.")
    d_model: int | None = Field(None, gt=0, description="Checked against the loaded model.")
    n_layers: int | None = Field(None, gt=0, description="Checked against the loaded model.")
    n_heads: int | None = Field(None, gt=0, description="Checked against the loaded model.")
    d_vocab: int | None = Field(None, gt=0, description="Checked against the loaded model.")
    fingerprint: str | None = Field(
        None,
        description="Hash of the checkpoint (its tensors and the coordinates) that tensor "
        "memories were made with; a different model is refused.",
    )
    coordinates: Coordinates | None = Field(
        None,
        description=(
            "Weight coordinates the memories were made in: 'processed' (LayerNorm folded, "
            "writing weights and unembedding centred, as the paper's HookedTransformer) or "
            "'raw' (the checkpoint's weights). Default: processed."
        ),
    )
    prepend_bos: bool | None = Field(
        None,
        description="Whether prompts get the BOS token first, as when the memories were made "
        "(default: the model source's convention).",
    )


class MemoryBase(StrictModel):
    """Fields every memory has, whatever its strategy."""

    name: str = Field(
        ..., min_length=1, max_length=128, pattern=NAME_PATTERN, description="Unique in a set."
    )
    layer: int = Field(..., ge=0, description="Layer ℓ whose site receives the memory.")
    positions: PositionMode | list[int] = Field(
        "all",
        description=(
            "Token positions that receive the memory: 'all', 'prompt', 'generated', 'last' "
            "(the prompt's last token) or a list of absolute positions (0 is the first token, "
            "BOS included; negative counts back from the prompt's end, -1 = last prompt token)."
        ),
    )
    enabled: bool = Field(True, description="A disabled memory is loaded and checked, not applied.")

    @field_validator("positions")
    @classmethod
    def _positions_nonempty_unique(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("an explicit position list must not be empty")
            if len(set(value)) != len(value):
                raise ValueError("positions must not repeat")
        return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class AddMemory(MemoryBase):
    """A text memory added at a site, scaled by τ (the paper's injection)."""

    _encoder_params: BaseModel | None = PrivateAttr(None)

    strategy: Literal["add"] = "add"
    text: str = Field(..., min_length=1, max_length=10_000, description="The memory's text.")
    encoding: str = Field("unembed", description="Encoder that turns the text into a vector.")
    params: dict[str, Any] | None = Field(
        None,
        description="The encoder's own parameters ([memory.params]); in a memory set they are "
        "validated by the encoder's params model, read back with encoder_params().",
    )
    head: int | None = Field(
        None, ge=0, description="Attention head; omitted = the whole attention output."
    )
    site: TextSite | None = Field(
        None,
        description="Where the vector is added; default 'attn_result' with a head, else "
        "'attn_out'. 'attn_z' with a head routes it through that head: the head's value mix "
        "moves by τ·v·pinv(W_O[head]), so the head writes the part of τ·v it can express "
        "(heads differ there; on 'attn_result' every head gives the same model).",
    )
    tau: float = Field(
        ...,
        validation_alias=AliasChoices("tau", "τ"),
        serialization_alias="tau",
        description="Magnitude τ the encoded vector is scaled by ('τ' is accepted too).",
    )

    tau_units: Literal["absolute", "resid_norm"] = Field(
        "absolute",
        description="'absolute': τ·v as the paper adds it; 'resid_norm': τ is the added "
        "vector's length in units of resid_norm, the layer's typical residual-stream norm "
        "(the vector added is τ·resid_norm·v/‖v‖), so one τ means the same at every layer "
        "and in every model.",
    )
    resid_norm: float | None = Field(
        None,
        gt=0,
        description="The reference norm of tau_units = 'resid_norm' (meminject sweep "
        "--tau-units resid_norm measures and records it per layer); required with it.",
    )

    @field_validator("tau")
    @classmethod
    def _tau_finite(cls, value: float) -> float:
        return _finite(value)

    @field_validator("resid_norm")
    @classmethod
    def _norm_finite(cls, value: float | None) -> float | None:
        return None if value is None else _finite(value)

    @model_validator(mode="after")
    def _norm_given_with_units(self) -> AddMemory:
        if self.tau_units == "resid_norm" and self.resid_norm is None:
            raise FieldValueError(
                "resid_norm", "tau_units = 'resid_norm' needs resid_norm (the reference norm)"
            )
        if self.tau_units == "absolute" and self.resid_norm is not None:
            raise FieldValueError(
                "resid_norm", "resid_norm is only used with tau_units = 'resid_norm'"
            )
        return self

    @model_validator(mode="after")
    def _site_matches_head(self) -> AddMemory:
        if self.head is not None and self.site not in (None, "attn_result", "attn_z"):
            raise FieldValueError(
                "head",
                f"'head' is only valid with site 'attn_result' or 'attn_z', not '{self.site}'",
            )
        if self.site in ("attn_result", "attn_z") and self.head is None:
            raise FieldValueError(
                "site", f"site '{self.site}' needs a 'head'; use 'attn_out' for the layer"
            )
        return self

    @property
    def resolved_site(self) -> str:
        if self.site is not None:
            return self.site
        return "attn_result" if self.head is not None else "attn_out"

    def encoder_params(self) -> BaseModel | None:
        """The validated ``params`` table of this memory's encoder, if it takes one."""
        return getattr(self, "_encoder_params", None)


# --- gates of local memories (meminject.gates computes them) ----------------------------


@dataclass(frozen=True)
class GateKind:
    """One registered gate: its name in a memory file (``gate = "…"``), the field that
    holds its parameter, that parameter's bounds, the default used without examples and
    the grid ``learn`` searches."""

    name: str
    code: int  # how a bank of mixed gates names each memory's gate (a tensor of codes)
    field: str
    low: float  # the parameter is above this
    high: float  # and below this (or at it, when ``high_inclusive``)
    high_inclusive: bool
    default: float
    grid: tuple[float, ...]
    meaning: str

    def check(self, value: float) -> str | None:
        """Why ``value`` is not a valid parameter of this gate, or None."""
        above = value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        if above and below:
            return None
        top = f"{self.high:g}]" if self.high_inclusive else f"{self.high:g})"
        return (
            f"{self.field} of the '{self.name}' gate must be in ({self.low:g}, {top}, got {value!r}"
        )


def _grid(last: float) -> tuple[float, ...]:
    return tuple(round(0.05 * i, 4) for i in range(1, round(last / 0.05) + 1))


#: The registered gates, by name. ``gate = "projection"`` is the default (the blog's).
GATES: dict[str, GateKind] = {}


def register_gate(kind: GateKind) -> None:
    """Add a gate kind (its name and code must be new)."""
    if kind.name in GATES or any(g.code == kind.code for g in GATES.values()):
        raise ValueError(f"gate '{kind.name}' (code {kind.code}) is registered already")
    GATES[kind.name] = kind


register_gate(
    GateKind(
        "projection",
        0,
        "boundary",
        0.0,
        1.0,
        False,
        0.25,
        _grid(0.95),
        "x = 1 − (a·k)/‖k‖², s = exp(−(x²/b²)^h); fires while |x| ≲ b",
    )
)
register_gate(
    GateKind(
        "cosine",
        1,
        "min_cosine",
        0.0,
        1.0,
        False,
        0.9,
        _grid(0.95),
        "c = cos(a, k), s = ((c − t)/(1 − t))₊^h; closed unless c > t",
    )
)
register_gate(
    GateKind(
        "distance",
        2,
        "radius",
        0.0,
        1.0,
        True,
        0.5,
        _grid(1.0),
        "d = ‖a − k‖/‖k‖, s = (1 − d²/r²)₊^h; closed unless d < r",
    )
)
GATE_NAMES = tuple(GATES)
PARAMETER_FIELDS = tuple(g.field for g in GATES.values())


GatedSite = Literal[
    "attn_z", "attn_out", "mlp_post", "mlp_out", "resid_pre", "resid_mid", "resid_post"
]


class GatedMemory(MemoryBase):
    """A gradient-derived local memory: ``a ← a + s·Δ`` with a similarity gate ``s`` of
    the activation to a stored key (``gate``: ``projection``, the blog's, with
    ``boundary``; ``cosine`` with ``min_cosine``; ``distance`` with ``radius``; see
    :mod:`meminject.gates`); k and Δ live in a safetensors file."""

    strategy: Literal["gated"]
    site: GatedSite = Field(..., description="Where the delta is added (and the key was read).")
    tensors: str = Field(
        ...,
        min_length=1,
        description="Safetensors file holding 'key' and 'delta', relative to this TOML file.",
    )
    gate: str = Field(
        "projection",
        description="The similarity gate: "
        + "; ".join(f"'{g.name}' ({g.field}): {g.meaning}" for g in GATES.values())
        + ".",
        json_schema_extra={"enum": list(GATE_NAMES)},
    )
    boundary: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="The 'projection' gate's width b in (0, 1): fires while |x| ≲ b.",
    )
    min_cosine: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="The 'cosine' gate's threshold t in (0, 1): closed unless cos(a, k) > t.",
    )
    radius: float | None = Field(
        None,
        gt=0,
        le=1,
        description="The 'distance' gate's radius r in (0, 1], in units of ‖k‖: closed "
        "unless ‖a − k‖ < r‖k‖.",
    )
    hardness: float = Field(3.0, gt=0, description="Gate hardness h: larger is sharper.")

    @field_validator("boundary", "min_cosine", "radius", "hardness")
    @classmethod
    def _finite_gate(cls, value: float | None) -> float | None:
        return None if value is None else _finite(value)

    @field_validator("gate")
    @classmethod
    def _known_gate(cls, value: str) -> str:
        if value not in GATES:
            raise ValueError(f"unknown gate '{value}'; registered: {', '.join(GATE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _gate_parameter(self) -> GatedMemory:
        kind = GATES[self.gate]
        for name in PARAMETER_FIELDS:
            given = getattr(self, name, None)
            if name == kind.field:
                if given is None:
                    raise FieldValueError(name, f"the '{self.gate}' gate needs '{name}'")
                problem = kind.check(given)
                if problem is not None:
                    raise FieldValueError(name, problem)
            elif given is not None:
                raise FieldValueError(
                    name,
                    f"'{name}' belongs to another gate; the '{self.gate}' gate takes "
                    f"'{kind.field}'",
                )
        return self

    @property
    def gate_parameter(self) -> float:
        """The value of this memory's gate parameter (b, t or r)."""
        return float(getattr(self, GATES[self.gate].field))


def _exact_version(value: Any) -> Any:
    """``version`` is the integer itself: ``true`` and ``1.0`` equal 1 in Python (bool is an
    int; a Literal compares by equality) but are not what the format says."""
    if isinstance(value, bool):
        raise ValueError(
            f"version must be the integer {FORMAT_VERSION}, not a boolean ({str(value).lower()})"
        )
    if isinstance(value, float):
        raise ValueError(f"version must be the integer {FORMAT_VERSION}, not a float ({value!r})")
    return value


def _memory_union(
    strategies: dict[str, type[MemoryBase]], encoder_params: dict[str, type[BaseModel] | None]
) -> Any:
    members = []
    for name, model in strategies.items():
        members.append(Annotated[_with_encoders(model, encoder_params), Tag(name)])

    def tag_of(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get("strategy", "add"))
        return str(getattr(value, "strategy", "add"))

    return Annotated[
        Union[tuple(members)],  # noqa: UP007 - built at run time
        Discriminator(
            tag_of,
            custom_error_type="unknown_strategy",
            custom_error_message=f"unknown strategy; registered: {', '.join(strategies)}",
        ),
    ]


def _with_encoders(
    model: type[MemoryBase], encoder_params: dict[str, type[BaseModel] | None]
) -> type[MemoryBase]:
    """Give a text memory model an ``encoding`` enum of the registered encoders, and check
    its ``params`` table against the chosen encoder's parameter model."""
    if "encoding" not in model.model_fields or not encoder_params:
        return model
    names = tuple(encoder_params)
    with_params = {n: p for n, p in encoder_params.items() if p is not None}
    params_schema: dict[str, Any] = {
        "description": "Parameters of the chosen encoder: "
        + (", ".join(f"'{n}' takes {p.__name__}" for n, p in with_params.items()) or "none")
        + ".",
    }
    if with_params:
        params_schema["anyOf"] = [
            {**p.model_json_schema(), "title": p.__name__} for p in with_params.values()
        ]
    fields: dict[str, Any] = {
        "encoding": (
            Literal[names],
            Field(model.model_fields["encoding"].default, description="Registered encoder."),
        ),
        "params": (
            dict[str, Any] | None,
            Field(None, json_schema_extra=params_schema),
        ),
    }

    def check_params(self: Any) -> Any:
        params_model = encoder_params.get(self.encoding)
        raw = self.params
        if params_model is None:
            if raw:
                raise FieldValueError("params", f"encoder '{self.encoding}' takes no params")
            return self
        try:
            validated = params_model.model_validate(raw or {})
        except ValidationError as exc:
            first = first_error(exc.errors())
            raise FieldValueError(
                field_path(first["loc"], prefix=("params",)),
                describe(
                    first, known=params_model.model_fields, owner=f"encoder '{self.encoding}'"
                ),
            ) from None
        object.__setattr__(self, "_encoder_params", validated)
        return self

    validators: dict[str, Any] = {"check_params": model_validator(mode="after")(check_params)}
    built: type[MemoryBase] = create_model(
        model.__name__, __base__=model, __validators__=validators, **fields
    )
    return built


def build_file_model(
    strategies: dict[str, type[MemoryBase]],
    encoder_params: dict[str, type[BaseModel] | None],
) -> type[StrictModel]:
    """The model of one memory file, for what is registered right now."""
    union = _memory_union(strategies, encoder_params)

    file_model: type[StrictModel] = create_model(
        "MemoryFile",
        __base__=StrictModel,
        version=(
            Annotated[Literal[1], BeforeValidator(_exact_version)],
            Field(..., description="File format version; this reader reads 1."),
        ),
        model=(ModelInfo | None, Field(None, description="What the memories were made for.")),
        memory=(list[union], Field(..., min_length=1, description="The memories.")),  # type: ignore[valid-type]
    )
    return file_model


def json_schema(file_model: type[BaseModel]) -> dict[str, Any]:
    """JSON Schema of the file format, for editors (``#:schema``) and docs."""
    schema = file_model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "meminject memory file"
    return schema


# --- The output of a generation ---------------------------------------------------------


class NextToken(BaseModel):
    """One of the most likely next tokens after the prompt, before sampling."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(description="The token's text, as the tokenizer decodes it alone.")
    token_id: int = Field(description="The token's id in the model's vocabulary.")
    prob: float = Field(description="Its probability (softmax of the scores), 0 to 1.")


class GenerationRecord(BaseModel):
    """One generation, as ``meminject generate --json`` and ``--prompts`` print it: one
    JSON object per line, the same fields for a single prompt, every line of a prompt
    file, and both runs of ``--compare`` (the baseline has ``memories: []``)."""

    model_config = ConfigDict(extra="forbid")

    id: str | int | None = Field(
        default=None, description="The prompt file line's id (null for a PROMPT argument)."
    )
    model: str = Field(description="The model's name.")
    prompt: str = Field(description="The prompt, as given (before any chat template).")
    memories: list[str] = Field(description="Names of the memories injected; [] for none.")
    completion: str = Field(description="The generated text (the reply with --chat).")
    finish_reason: Literal["eos", "stop", "length", "context", "cancelled"] = Field(
        description="eos, stop (a stop string), length (max_new_tokens), context (the "
        "model's context is full) or cancelled."
    )
    prompt_tokens: list[int] = Field(
        description="Token ids the model read (BOS and chat template included)."
    )
    new_tokens: list[int] = Field(description="Token ids generated.")
    top_next: list[NextToken] = Field(
        description="The most likely next tokens after the prompt (--show-top of them)."
    )
    backend: str = Field(description="The backend that ran the forward passes.")


def generation_json_schema() -> dict[str, Any]:
    """JSON Schema of one ``generate --json`` line (docs/python-api.md publishes it)."""
    schema = GenerationRecord.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "meminject generation"
    return schema
