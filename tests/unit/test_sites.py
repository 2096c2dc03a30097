"""The sites table (meminject.sites): what files accept, hook points, and the facts the
backends and strategies read from it rather than spelling them out."""

from __future__ import annotations

import typing

import pytest

from meminject import sites
from meminject.extension import site_hook
from meminject.learn import LEARN_SITES
from meminject.schema import GatedSite, Site, TextSite


def test_the_sites_table_is_what_the_file_format_accepts():
    assert set(typing.get_args(Site)) == set(sites.SITES)
    assert set(typing.get_args(TextSite)) == {*sites.D_MODEL_SITES, "attn_z"}
    assert set(typing.get_args(GatedSite)) == set(sites.LAYER_SITES) == set(LEARN_SITES)


def test_site_helpers_name_hook_points_and_flags():
    assert sites.hook_name("resid_post", 4) == "blocks.4.hook_resid_post"
    per_head = site_hook("attn_result", 2, lambda a, c: a)
    assert (per_head.hook_name, per_head.needs_attn_result) == ("blocks.2.attn.hook_result", True)
    layer_wide = site_hook("mlp_out", 0, lambda a, c: a)
    assert (layer_wide.hook_name, layer_wide.needs_attn_result) == ("blocks.0.hook_mlp_out", False)
    with pytest.raises(ValueError, match=r"unknown site 'mlp'; sites: attn_result"):
        sites.hook_name("mlp", 0)
    rows = sites.table_rows()
    assert [r["site"] for r in rows] == list(sites.SITES)
    assert {r["site"] for r in rows if r["writes_residual"]} == {
        "attn_out",
        "mlp_out",
        "resid_pre",
        "resid_mid",
        "resid_post",
    }


def test_every_hook_point_parses_back_to_its_site_and_layer():
    for name, info in sites.TABLE.items():
        assert sites.parse_hook_name(sites.hook_name(name, 7)) == (info, 7)
    assert sites.parse_hook_name("blocks.3.hook_resid_pre.extra") is None
    assert sites.parse_hook_name("blocks.x.hook_resid_pre") is None


def test_the_heads_sum_is_in_the_table_but_not_in_files():
    assert sites.HEADS_SUM is sites.TABLE["attn_heads_sum"]
    assert sites.hook_name("attn_heads_sum", 2) == "blocks.2.attn.hook_out"
    assert "attn_heads_sum" not in sites.SITES
    assert "attn_heads_sum" not in typing.get_args(Site)


def test_per_head_changes_are_lowered_onto_the_heads_sum():
    assert {n for n, s in sites.TABLE.items() if s.through_heads} == {"attn_result", "attn_z"}
    assert sites.heads_sum_site(post_sublayer_norms=False).name == "attn_out"
    assert sites.heads_sum_site(post_sublayer_norms=True).name == "attn_heads_sum"


def test_where_a_plain_block_computes_each_site():
    # attn_result exists only inside the bridge; every other site has a plain module.
    assert set(sites.TABLE) - {"attn_result"} == sites.PLAIN_SITES
    assert sites.TABLE["resid_pre"].plain == ("block", "input")
    assert sites.TABLE["attn_z"].plain == ("attn_out_proj", "heads_input")
    assert sites.TABLE["resid_mid"].plain == ("attn_contribution", "resid_mid")
    roles = {s.plain[0] for s in sites.TABLE.values() if s.plain is not None}
    assert roles == {
        "block",
        "attn",
        "attn_contribution",
        "attn_out_proj",
        "mlp_contribution",
        "mlp_out_proj",
    }
