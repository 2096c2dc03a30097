"""Loading a model without TransformerLens: the checkpoint straight into a plain Hugging
Face model, processed in place (:mod:`meminject.processing`), served by the ``hf``
backend.

``transformers`` builds the model on the meta device and streams the checkpoint's
tensors into it, so the weights exist once; processing then changes them a block at a
time. What TransformerBridge would otherwise tell — the model's facts, where each
block's modules are — is read from the configuration and the family table, and every
site the plain model serves is the bridge's own activation (the identity map): the
tests hold each family's tensors, sites and logits to the bridge's
(tests/integration/test_processing.py, and SmolLM2 and Gemma 3 in the realmodel tier).
The bridge still boots on first use, for what only it has (per-head results, an
analysis, a plugin's hook point).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.backends.hf import BlockPaths, HFBackend, SiteMap
from meminject.dtypes import resolve_dtype
from meminject.model_handle import BosRule, BridgeRecipe, LoadedModel, ModelDims, ModelFacts, Served
from meminject.processing import Family, family_of, process_in_place
from meminject.sites import PLAIN_SITES, hook_name

if TYPE_CHECKING:
    import torch


def supported(source_dir: Path) -> Family | None:
    """The processing family of the checkpoint in ``source_dir``, None when it is not
    one this loader knows (it then loads through TransformerBridge)."""
    import json

    try:
        config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return family_of(_Config(config))


class _Config:
    """Attribute access to a config.json's values (enough for :func:`family_of`)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.model_type = data.get("model_type")


def facts_of(config: Any, family: Family) -> ModelFacts:
    """What meminject reads from a model, from its Hugging Face configuration."""
    d_model = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    dims = ModelDims(
        n_layers=int(config.num_hidden_layers),
        n_heads=n_heads,
        d_model=d_model,
        d_vocab=int(config.vocab_size),
        n_ctx=int(config.max_position_embeddings),
    )
    return ModelFacts(
        dims=dims,
        d_head=int(getattr(config, "head_dim", None) or d_model // n_heads),
        d_mlp=int(d_mlp) if d_mlp else 4 * d_model,
        parallel_attn_mlp=bool(getattr(config, "use_parallel_residual", False)),
        post_sublayer_norms=family.ln1_post is not None,
    )


def block_paths(family: Family) -> BlockPaths:
    """Where each block keeps its attention, MLP and output projections."""
    attn, _, attn_o = family.attn_out.rpartition(".")
    mlp, _, mlp_out = family.mlp_out.rpartition(".")
    return BlockPaths(
        blocks=family.blocks,
        attn=attn,
        attn_o=attn_o,
        mlp=mlp,
        mlp_out=mlp_out,
        ln1_post=family.ln1_post,
        ln2_post=family.ln2_post,
    )


def site_maps(facts: ModelFacts) -> dict[str, SiteMap | str]:
    """Every site the plain model serves, as the bridge's activation itself; a parallel
    block's resid_mid does not exist."""
    maps: dict[str, SiteMap | str] = {}
    for site in sorted(PLAIN_SITES):
        for layer in range(facts.dims.n_layers):
            name = hook_name(site, layer)
            if site == "resid_mid" and facts.parallel_attn_mlp:
                maps[name] = "a parallel-attention block has no resid_mid to hook"
            else:
                maps[name] = SiteMap("identity")
    return maps


def load_plain(
    source_dir: Path,
    family: Family,
    *,
    name: str,
    device: str,
    dtype: str,
    coordinates: str,
    bos: BosRule,
    origin: str | None,
    recipe: BridgeRecipe,
) -> LoadedModel:
    """The model in ``source_dir`` as a plain Hugging Face model in ``coordinates``,
    served by the ``hf`` backend, without importing TransformerLens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype: torch.dtype = resolve_dtype(dtype)
    plain: Any
    try:
        plain = AutoModelForCausalLM.from_pretrained(
            str(source_dir), dtype=torch_dtype, attn_implementation="sdpa"
        )
    except ValueError:
        plain = AutoModelForCausalLM.from_pretrained(
            str(source_dir), dtype=torch_dtype, attn_implementation="eager"
        )
    plain = plain.to(device).eval()
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    unembedding = process_in_place(plain, family) if coordinates == "processed" else None
    facts = facts_of(plain.config, family)
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    served = Served(
        hf=plain,
        tokenizer=tokenizer,
        device=device,
        dtype=torch_dtype,
        directory=source_dir,
        unembedding=unembedding,
    )
    loaded = LoadedModel(
        bridge=None,
        name=name,
        coordinates=coordinates,
        source=recipe.source,
        bos=bos,
        origin=origin,
        facts=facts,
        served=served,
        bridge_recipe=recipe,
    )
    loaded.backends["hf"] = HFBackend(loaded, plain, block_paths(family), site_maps(facts))
    return loaded
