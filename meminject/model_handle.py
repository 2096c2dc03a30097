"""The model handle: a loaded model as every layer above sees it.

:class:`LoadedModel` is what encoders, strategies, backends and commands receive; how
it was loaded (:mod:`meminject.loading`) is not their business. The handle holds the
TransformerBridge, booted on first use for a model loaded from a served snapshot, or
the plain Hugging Face model that snapshot holds (:class:`Served`), with the facts
meminject reads from the configuration either way (:class:`ModelFacts`).

The one rules live here too (dtype names are :mod:`meminject.dtypes`'): coordinates
(:data:`COORDINATES`), whether prompts start with BOS (:class:`BosRule`) and the
padding token (:attr:`LoadedModel.pad_token_id`).

Coordinates matter (docs/architecture.md, "Coordinates"): by default the bridge is put
in compatibility mode, which folds LayerNorm and centres weights as the paper's
``HookedTransformer`` did, so ``W_U``-based encodings match the paper's numbers.
``coordinates="raw"`` keeps the checkpoint's own weights.

Importing this module is cheap: no torch, no transformer_lens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError, ContextTooLongError, ModelLoadError
from meminject.sites import site_info

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float, Int
    from torch import Tensor
    from transformer_lens.model_bridge import TransformerBridge

    from meminject.processing import LazyUnembedding
    from meminject.schema import ModelInfo

#: ``processed``: LayerNorm folded and weights centred (the paper's HookedTransformer);
#: ``raw``: the checkpoint's own weights.
COORDINATES = ("processed", "raw")


def check_coordinates(coordinates: str) -> str:
    if coordinates not in COORDINATES:
        raise BadInputError(f"unknown coordinates '{coordinates}'; choose processed or raw")
    return coordinates


@dataclass(frozen=True)
class BosRule:
    """Whether prompts start with the BOS token: the one rule, first answer wins.

    1. ``asked``: what the caller chose (``load_model(prepend_bos=…)``,
       ``--prepend-bos/--no-prepend-bos``);
    2. the memory files' ``[model] prepend_bos`` — of the set a prompt runs with
       (:meth:`LoadedModel.prepend_bos_for`), else of the set given at load (``files``);
    3. ``convention``: the model source's (a registered source states it; for a GGUF
       file, what its tokenizer does);
    4. TransformerLens's default: on, as the paper ran.
    """

    asked: bool | None = None
    files: bool | None = None
    convention: bool | None = None

    def resolve(self, files: bool | None = None) -> bool:
        for choice in (self.asked, files, self.files, self.convention):
            if choice is not None:
                return choice
        return True


#: How fingerprints of the first scheme (the bridge's state dict) begin.
LEGACY_FINGERPRINT = "blake2b:"
#: How checkpoint fingerprints begin.
CHECKPOINT_FINGERPRINT = "checkpoint-sha256:"


def checkpoint_fingerprint(source_dir: Path, coordinates: str) -> str | None:
    """A hash of every tensor (name, dtype, shape, bytes) in the safetensors files of
    ``source_dir`` and of ``coordinates``; None when there are none. Independent of how
    the model is loaded and of the files' layout (shards, header order)."""
    import hashlib
    from contextlib import ExitStack

    import torch
    from safetensors import safe_open

    files = sorted(source_dir.glob("*.safetensors")) if source_dir.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256(f"coordinates={coordinates}".encode())
    with ExitStack() as stack:
        readers = [stack.enter_context(safe_open(str(p), framework="pt")) for p in files]
        where = {name: reader for reader in readers for name in reader.keys()}  # noqa: SIM118
        for name in sorted(where):
            tensor = where[name].get_tensor(name).contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return CHECKPOINT_FINGERPRINT + digest.hexdigest()


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a loaded model that memory files are checked against."""

    n_layers: int
    n_heads: int
    d_model: int
    d_vocab: int
    n_ctx: int


@dataclass(frozen=True)
class ModelFacts:
    """What meminject reads from a model's configuration, kept apart from the bridge so
    that a model loaded from a served snapshot (:mod:`meminject.snapshots`) answers
    without TransformerLens."""

    dims: ModelDims
    d_head: int
    d_mlp: int | None
    parallel_attn_mlp: bool
    #: Gemma 2/3: each block normalises its attention and MLP outputs before adding them.
    post_sublayer_norms: bool

    @classmethod
    def of_bridge(cls, bridge: Any) -> ModelFacts:
        cfg = bridge.cfg
        mapping = getattr(bridge.adapter, "component_mapping", None) or {}
        blocks = mapping.get("blocks") if hasattr(mapping, "get") else None
        subs = getattr(blocks, "submodules", None) or {}
        dims = ModelDims(
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            d_model=int(cfg.d_model),
            d_vocab=int(cfg.d_vocab),
            n_ctx=int(cfg.n_ctx),
        )
        return cls(
            dims=dims,
            d_head=int(cfg.d_head or dims.d_model // dims.n_heads),
            d_mlp=int(cfg.d_mlp) if cfg.d_mlp else None,
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
            post_sublayer_norms="ln1_post" in subs or "ln2_post" in subs,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: getattr(self.dims, k) for k in ("n_layers", "n_heads", "d_model", "d_vocab")},
            "n_ctx": self.dims.n_ctx,
            "d_head": self.d_head,
            "d_mlp": self.d_mlp,
            "parallel_attn_mlp": self.parallel_attn_mlp,
            "post_sublayer_norms": self.post_sublayer_norms,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelFacts:
        dims = ModelDims(**{k: int(data[k]) for k in ModelDims.__dataclass_fields__})
        d_mlp = data.get("d_mlp")
        return cls(
            dims=dims,
            d_head=int(data["d_head"]),
            d_mlp=int(d_mlp) if d_mlp else None,
            parallel_attn_mlp=bool(data["parallel_attn_mlp"]),
            post_sublayer_norms=bool(data["post_sublayer_norms"]),
        )


@dataclass(frozen=True)
class BridgeRecipe:
    """How to boot the bridge later, for a model loaded without it."""

    source: str
    device: str
    dtype: str


@dataclass(eq=False)
class Served:
    """The plain model a :class:`LoadedModel` loaded without the bridge runs on: from
    the checkpoint (:mod:`meminject.plain_loading`) or from a served snapshot
    (:mod:`meminject.snapshots`)."""

    hf: Any
    tokenizer: Any
    device: str
    dtype: torch.dtype
    directory: Path
    #: The processed unembedding when ``hf``'s ``lm_head`` keeps the raw weights (an
    #: RMSNorm family: :class:`meminject.processing.LazyUnembedding`); None when
    #: ``lm_head`` holds it.
    unembedding: LazyUnembedding | None = None


class LoadedModel:
    """A model as meminject runs it: the bridge (TransformerBridge) for analysis and
    per-head work, plus its name, coordinates and the per-(memory, model) encoding cache
    (encodings are computed once, never in a hook).

    A model loaded without the bridge (the default of ``load_model``) starts with
    only the plain Hugging Face model that generation runs on; the bridge is booted the
    first time something asks for it (an analysis, a per-head memory, a plugin)."""

    def __init__(
        self,
        bridge: TransformerBridge | None,
        name: str,
        coordinates: str,
        source: str,
        *,
        bos: BosRule | None = None,
        coordinates_asked: bool = False,
        origin: str | None = None,
        facts: ModelFacts | None = None,
        served: Served | None = None,
        fingerprint: str | None = None,
        bridge_recipe: BridgeRecipe | None = None,
    ):
        if bridge is None and (served is None or facts is None):
            raise ValueError("a LoadedModel needs a bridge, or a served model and its facts")
        self._bridge = bridge
        self.name = name
        self.coordinates = coordinates
        self.source = source
        #: Whether prompts get the BOS token first, and why (:class:`BosRule`).
        self.bos = bos if bos is not None else BosRule()
        #: Whether the caller chose ``coordinates`` (rather than taking the default), so
        #: a memory set's ``[model] coordinates`` may not override it.
        self.coordinates_asked = coordinates_asked
        #: What the user named, when the weights came from elsewhere (a GGUF file).
        self.origin = origin
        self.facts = facts if facts is not None else ModelFacts.of_bridge(bridge)
        #: The served snapshot this model was loaded from (:mod:`meminject.snapshots`).
        self.served = served
        self.encodings: dict[Any, torch.Tensor] = {}
        #: Backends built for this model (:mod:`meminject.backends`), by name, or the
        #: reason one could not be built; filled on first use.
        self.backends: dict[str, Any] = {}
        self._fingerprint = fingerprint
        self._legacy_fingerprint: str | None = None
        self.bridge_recipe = bridge_recipe
        #: torch's thread count when the bridge processed the weights (None: unknown).
        #: Folding and centring sum floats, so the last bits of processed weights can
        #: depend on it; ``sweep --executor ray`` loads its workers' copies alike.
        self.load_threads: int | None = None
        if bridge is not None:
            bridge.cfg.default_prepend_bos = self.prepend_bos

    def __repr__(self) -> str:
        how = "bridge" if self._bridge is not None else "plain model"
        return f"LoadedModel(name={self.name!r}, coordinates={self.coordinates!r}, {how})"

    def _served(self) -> Served:
        assert self.served is not None  # a model without a bridge has a served one
        return self.served

    @property
    def bridge(self) -> TransformerBridge:
        """The TransformerBridge; booted on first use for a model loaded light."""
        if self._bridge is None:
            self._bridge = self._boot_bridge()
        return self._bridge

    @property
    def has_bridge(self) -> bool:
        return self._bridge is not None

    def _boot_bridge(self) -> TransformerBridge:
        from meminject.bridge_boot import boot_bridge

        recipe = self.bridge_recipe
        if recipe is None:
            raise ModelLoadError(f"model '{self.name}' has no source to boot TransformerLens from")
        import torch

        bridge = boot_bridge(recipe.source, recipe.device, recipe.dtype, self.coordinates)
        bridge.cfg.default_prepend_bos = self.prepend_bos
        self.load_threads = torch.get_num_threads()
        return bridge

    def fingerprint(self) -> str:
        """A hash of the checkpoint's weights and the coordinates they are used in, so a
        key/delta memory made on one model is refused on another. Read from the
        checkpoint's safetensors files, tensor by tensor, so every load path gives the
        same one without TransformerLens; a model without local safetensors (a hub name,
        a plugin's bridge) hashes the bridge's weights instead (:meth:`legacy_fingerprint`).
        Computed once, on first use."""
        if self._fingerprint is None:
            source = Path(self.bridge_recipe.source) if self.bridge_recipe else None
            found = checkpoint_fingerprint(source, self.coordinates) if source else None
            self._fingerprint = found or self.legacy_fingerprint()
        return self._fingerprint

    def legacy_fingerprint(self) -> str:
        """The fingerprint memory files written before checkpoint fingerprints carry: a
        hash of the bridge's state dict as loaded (it boots the bridge)."""
        if self._legacy_fingerprint is None:
            import hashlib

            import torch

            digest = hashlib.blake2b(digest_size=16)
            digest.update(self.coordinates.encode())
            state = self.bridge.original_model.state_dict()
            for name in sorted(state):
                tensor = state[name].detach()
                digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._legacy_fingerprint = f"{LEGACY_FINGERPRINT}{digest.hexdigest()}"
        return self._legacy_fingerprint

    def fingerprint_like(self, fingerprint: str) -> str:
        """This model's fingerprint in the scheme of ``fingerprint`` (a memory file's)."""
        if fingerprint.startswith(LEGACY_FINGERPRINT):
            return self.legacy_fingerprint()
        return self.fingerprint()

    def made_for(self, fingerprint: str) -> bool:
        """Whether a memory file's ``[model] fingerprint`` names this model, in either
        scheme (a legacy one is checked through the bridge)."""
        return fingerprint == self.fingerprint_like(fingerprint)

    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def device(self) -> torch.device:
        import torch

        if self._bridge is None:
            return torch.device(self._served().device)
        return torch.device(self._bridge.cfg.device or "cpu")

    @property
    def dtype(self) -> torch.dtype:
        if self._bridge is None:
            return self._served().dtype
        return next(self._bridge.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        if self._bridge is None:
            return self._served().tokenizer
        return self._bridge.tokenizer

    @property
    def dims(self) -> ModelDims:
        return self.facts.dims

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding, in this model's coordinates. A plain RMSNorm model computes
        it here from its raw ``lm_head``, a full copy: read a few columns with
        :meth:`unembed_columns` instead."""
        if self._bridge is None:
            served = self._served()
            lm_head = served.hf.get_output_embeddings().weight
            if served.unembedding is not None:
                return served.unembedding.matrix(lm_head)
            return lm_head.T
        return self._bridge.W_U

    def unembed_columns(self, tokens: list[int]) -> Float[Tensor, "d_model n"]:
        """``W_U[:, tokens]`` in float32, without materializing a lazy unembedding."""
        if self._bridge is None:
            served = self._served()
            lm_head = served.hf.get_output_embeddings().weight
            if served.unembedding is not None:
                return served.unembedding.columns(lm_head, tokens)
            return lm_head.T[:, tokens].float()
        return self._bridge.W_U[:, tokens].float()

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding, in this model's coordinates."""
        if self._bridge is None:
            return self._served().hf.get_input_embeddings().weight
        return self._bridge.W_E

    def site_shape(self, site: str) -> tuple[int, ...]:
        """Shape of one position's activation at a site (what keys and deltas must have)."""
        return site_shape(self, site)

    def model_table(self) -> dict[str, Any]:
        """The ``[model]`` table describing this model, fingerprint included."""
        dims = self.dims
        return {
            "name": self.name,
            "d_model": dims.d_model,
            "n_layers": dims.n_layers,
            "n_heads": dims.n_heads,
            "d_vocab": dims.d_vocab,
            "coordinates": self.coordinates,
            "prepend_bos": self.prepend_bos,
            "fingerprint": self.fingerprint(),
        }

    @property
    def prepend_bos(self) -> bool:
        """Whether prompts get BOS first: :meth:`BosRule.resolve` of this model's rule.
        Setting it is asking for it (as ``--prepend-bos`` does)."""
        return self.bos.resolve()

    @prepend_bos.setter
    def prepend_bos(self, value: bool) -> None:
        self.bos = dataclasses.replace(self.bos, asked=bool(value))
        if self._bridge is not None:
            self._bridge.cfg.default_prepend_bos = self.prepend_bos

    def prepend_bos_for(self, info: ModelInfo | None) -> bool:
        """BOS for prompts run with a memory set whose ``[model]`` table is ``info``:
        the set's ``prepend_bos`` applies unless the caller chose one, as on the
        command line."""
        return self.bos.resolve(files=info.prepend_bos if info is not None else None)

    @property
    def pad_token_id(self) -> int:
        """What fills a padded row's empty columns (masked out or never read, so any id
        would do): the tokenizer's pad token, else EOS, else BOS, else 0."""
        tokenizer = self.tokenizer
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def post_sublayer_norms(self) -> bool:
        """Whether each block normalises its attention and MLP outputs before adding them
        to the residual stream (Gemma 2/3). Then ``attn_out``/``mlp_out`` are those
        normalised contributions, and one head's result is no longer a summand of
        ``attn_out`` but of the attention's output before its norm (``attn.hook_out``)."""
        return self.facts.post_sublayer_norms

    def tokenize(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS follows the model's default unless told."""
        bos = self.prepend_bos if prepend_bos is None else prepend_bos
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        if bos:
            bos_id = self.tokenizer.bos_token_id
            if bos_id is None:
                raise BadInputError(f"model '{self.name}' has no BOS token to prepend")
            ids = [int(bos_id), *ids]
        return [int(t) for t in ids]

    def continuation_ids(self, text: str, what: str = "the target") -> list[int]:
        """Token ids of ``text`` as it follows a prompt: the one rule of every command
        that takes a target or token text (``learn``/``evaluate --target``, ``inspect
        --token``). A space is put before it unless it starts with whitespace, since
        GPT-2-style tokenizers mark the start of a word with it ('Paris' → ' Paris')."""
        if not text.strip():
            raise BadInputError(f"{what} is empty")
        ids = self.tokenize(continuation(text), prepend_bos=False)
        if not ids:
            raise BadInputError(f"{what} {text!r} encodes to no tokens")
        return ids

    def to_tokens(self, text: str) -> Int[Tensor, "1 pos"]:
        import torch

        ids = self.check_prompt_ids(self.tokenize(text))
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def check_prompt_ids(self, ids: list[int]) -> list[int]:
        """``ids`` if they can be a prompt: not empty, and within the model's context."""
        if not ids:
            raise BadInputError("the prompt is empty and the model prepends no BOS token")
        if len(ids) > self.dims.n_ctx:
            raise ContextTooLongError(
                f"the prompt is {len(ids)} tokens, longer than the model's context of "
                f"{self.dims.n_ctx}"
            )
        return ids

    def decode(self, ids: Any) -> str:
        return str(self.tokenizer.decode([int(t) for t in ids]))

    def token_str(self, token_id: int) -> str:
        return self.decode([token_id])


def continuation(text: str) -> str:
    """``text`` as it follows a prompt: a space before it unless it starts with
    whitespace (see :meth:`LoadedModel.continuation_ids`)."""
    return text if text[:1].isspace() else " " + text


def site_shape(model: LoadedModel, site: str) -> tuple[int, ...]:
    """Shape of one position's activation at ``site`` in ``model`` (per head for a
    per-head site): what a key, a delta or an encoding used there must have."""
    info = site_info(site)
    facts = model.facts
    dims = facts.dims
    if info.width == "heads":
        return (dims.n_heads, facts.d_head)
    if info.width == "d_mlp":
        if not facts.d_mlp:
            raise BadInputError(f"model '{model.name}' does not report its MLP width (d_mlp)")
        return (facts.d_mlp,)
    return (dims.d_model,)
