"""Sites: the named places in a block where memories act, as one table of data.

A *site* is what a memory file names (``site = "mlp_out"``); a *hook point* is the
TransformerLens name it resolves to at a layer (``blocks.3.hook_mlp_out``). Every other
module, and every plugin, asks this one for names, hook points, widths and whether a
site writes the residual stream, so the table is spelled out once (the way pyvene keeps
its site → module tables as data).

Nothing here imports torch: strategies are compiled from it, and memory files are
validated against it without a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    pass

Width = Literal["d_model", "d_mlp", "heads"]


@dataclass(frozen=True)
class SiteInfo:
    """One site: its hook point and the shape of one position's activation there."""

    name: str
    #: TransformerLens hook point, with ``{layer}`` to fill in.
    hook: str
    #: ``d_model``: the model's width; ``d_mlp``: the MLP's hidden width; ``heads``:
    #: ``[n_heads, d_head]`` (``attn_z``) or, with a head axis, ``[n_heads, d_model]``.
    width: Width
    #: Whether the activation has a head axis the bridge must be asked to compute.
    per_head: bool
    #: Whether a change here is itself a change of the residual stream (rather than of
    #: a quantity the stream is later computed from).
    writes_residual: bool
    description: str
    #: Where a plain Hugging Face block computes it, for backends that run without the
    #: bridge: (the module's role in the block, how to read it there): ``input`` or
    #: ``output`` of the module, ``heads_input`` (its input, split per head) or
    #: ``resid_mid`` (the block's input plus that module's output). None: only the
    #: bridge has it. Roles: block, attn (the attention's own output), attn_contribution
    #: and mlp_contribution (what is added to the stream), attn_out_proj, mlp_out_proj.
    plain: tuple[str, str] | None = None
    #: Whether a change here reaches the residual stream only through the sum of the
    #: heads, so strategies lower it onto :func:`heads_sum_site`.
    through_heads: bool = False
    #: Whether a memory file may name it (the heads' sum is for lowering only).
    in_files: bool = True


#: Every site, the ones memory files name and the heads' sum strategies lower onto.
TABLE: dict[str, SiteInfo] = {
    s.name: s
    for s in (
        SiteInfo(
            "attn_result",
            "blocks.{layer}.attn.hook_result",
            "d_model",
            per_head=True,
            writes_residual=False,
            through_heads=True,
            description="One head's output, before the heads are summed ([n_heads, d_model] "
            "per position; a memory picks one head).",
        ),
        SiteInfo(
            "attn_out",
            "blocks.{layer}.hook_attn_out",
            "d_model",
            per_head=False,
            writes_residual=True,
            plain=("attn_contribution", "output"),
            description="The attention layer's output, added to the residual stream.",
        ),
        SiteInfo(
            "attn_z",
            "blocks.{layer}.attn.hook_z",
            "heads",
            per_head=False,
            writes_residual=False,
            plain=("attn_out_proj", "heads_input"),
            through_heads=True,
            description="Each head's value-weighted mix, before the output projection "
            "([n_heads, d_head] per position).",
        ),
        SiteInfo(
            "mlp_post",
            "blocks.{layer}.mlp.hook_post",
            "d_mlp",
            per_head=False,
            writes_residual=False,
            plain=("mlp_out_proj", "input"),
            description="The MLP's hidden activation, after the nonlinearity ([d_mlp]).",
        ),
        SiteInfo(
            "mlp_out",
            "blocks.{layer}.hook_mlp_out",
            "d_model",
            per_head=False,
            writes_residual=True,
            plain=("mlp_contribution", "output"),
            description="The MLP's output, added to the residual stream.",
        ),
        SiteInfo(
            "resid_pre",
            "blocks.{layer}.hook_resid_pre",
            "d_model",
            per_head=False,
            writes_residual=True,
            plain=("block", "input"),
            description="The residual stream entering the block.",
        ),
        SiteInfo(
            "resid_mid",
            "blocks.{layer}.hook_resid_mid",
            "d_model",
            per_head=False,
            writes_residual=True,
            plain=("attn_contribution", "resid_mid"),
            description="The residual stream between attention and MLP (sequential blocks).",
        ),
        SiteInfo(
            "resid_post",
            "blocks.{layer}.hook_resid_post",
            "d_model",
            per_head=False,
            writes_residual=True,
            plain=("block", "output"),
            description="The residual stream leaving the block.",
        ),
        # The attention's own output, the sum of its heads before any post-attention
        # norm (on Gemma 2/3, attn_out is that sum normalised). Not a site a memory file
        # names: the add strategy lowers per-head memories onto it there.
        SiteInfo(
            "attn_heads_sum",
            "blocks.{layer}.attn.hook_out",
            "d_model",
            per_head=False,
            writes_residual=True,
            description="The sum of the attention heads' results, before any post-attention norm.",
            plain=("attn", "output"),
            in_files=False,
        ),
    )
}

#: The sites a memory file may name.
SITES: dict[str, SiteInfo] = {name: s for name, s in TABLE.items() if s.in_files}

#: The heads' sum (see :func:`heads_sum_site`).
HEADS_SUM = TABLE["attn_heads_sum"]

#: Sites a plain Hugging Face model can hook (:attr:`SiteInfo.plain`).
PLAIN_SITES: frozenset[str] = frozenset(name for name, s in TABLE.items() if s.plain is not None)


def heads_sum_site(post_sublayer_norms: bool) -> SiteInfo:
    """Where a change made through the heads (:attr:`SiteInfo.through_heads`) is added:
    the attention output, or the heads' sum before the norm in blocks that normalise the
    attention output before the residual add (Gemma 2/3), where the heads' results are
    still exactly summands."""
    return HEADS_SUM if post_sublayer_norms else TABLE["attn_out"]


_HOOK_PATTERNS = [
    (re.compile("^" + re.escape(s.hook).replace(re.escape("{layer}"), r"(\d+)") + "$"), s)
    for s in TABLE.values()
]


def parse_hook_name(name: str) -> tuple[SiteInfo, int] | None:
    """The site and layer behind a hook point (``blocks.3.hook_mlp_out`` → mlp_out, 3),
    for every site of :data:`TABLE`; None for any other hook point."""
    for pattern, info in _HOOK_PATTERNS:
        match = pattern.match(name)
        if match is not None:
            return info, int(match.group(1))
    return None


#: Sites whose activation (per head, for ``attn_result``) has the model's width, so a
#: text's encoding fits them.
D_MODEL_SITES: tuple[str, ...] = tuple(s.name for s in SITES.values() if s.width == "d_model")

#: Sites without a head axis: where gated (learned) memories live.
LAYER_SITES: tuple[str, ...] = tuple(s.name for s in SITES.values() if not s.per_head)


def site_info(site: str) -> SiteInfo:
    """The table row of ``site``; a ValueError naming the known sites otherwise."""
    try:
        return TABLE[site]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; sites: {', '.join(SITES)}") from None


def hook_name(site: str, layer: int) -> str:
    """The TransformerLens hook point of ``site`` at ``layer``: ``blocks.3.hook_mlp_out``."""
    return site_info(site).hook.format(layer=int(layer))


def table_rows() -> list[dict[str, Any]]:
    """The table as plain rows, for docs and ``--json`` listings."""
    return [
        {
            "site": s.name,
            "hook": s.hook,
            "width": s.width,
            "per_head": s.per_head,
            "writes_residual": s.writes_residual,
            "description": s.description,
        }
        for s in SITES.values()
    ]
