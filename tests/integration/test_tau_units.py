"""τ in units of the layer's residual-stream norm (issue 15): measured, recorded, and
applied the same by the sweep and by memory files."""

from __future__ import annotations

import math

import pytest
import torch

import meminject
from meminject.errors import BadInputError, MemoryFileError
from meminject.memfile import memories_from_tables
from meminject.plugins import get_registry
from meminject.sweep import SweepConfig, reference_cell, residual_norms, run_sweep
from tests.integration.test_sweep import ROWS

pytestmark = pytest.mark.integration


def test_residual_norms_by_hand(gpt2):
    norms = residual_norms(gpt2, ROWS, [0, 1])
    for layer in (0, 1):
        values = []
        for row in ROWS:
            _, cache = gpt2.bridge.run_with_cache(gpt2.to_tokens(row.prompt))
            resid = cache[f"blocks.{layer}.hook_resid_pre"][0]
            values += resid[1:].norm(dim=-1).tolist()  # position 0, the sink, left out
        assert norms[layer] == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert norms[0] != pytest.approx(norms[1], rel=1e-3)  # the layers differ, or this is moot


def test_residual_norms_leave_out_position_0_without_bos_too(tmp_path):
    """With BOS off, the prompt's first token is the attention sink: left out as well."""
    from meminject.loading import load_model
    from meminject.testing import build_tiny_model

    model = load_model(build_tiny_model(tmp_path / "llama", "llama"), prepend_bos=False)
    assert not model.prepend_bos
    norms = residual_norms(model, ROWS, [1])
    values = []
    for row in ROWS:
        _, cache = model.bridge.run_with_cache(model.to_tokens(row.prompt))
        assert cache["blocks.1.hook_resid_pre"].shape[1] == len(model.tokenize(row.prompt))
        values += cache["blocks.1.hook_resid_pre"][0, 1:].norm(dim=-1).tolist()
    assert norms[1] == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_sweep_in_norm_units_equals_memories_in_norm_units(gpt2):
    config = SweepConfig(layers=(0, 1), taus=(0.5,), controls=1, tau_units="resid_norm")
    result = run_sweep(gpt2, ROWS[:3], config)
    norms = result.stats["resid_norms"]
    assert norms == pytest.approx(residual_norms(gpt2, ROWS[:3], [0, 1]))
    records = result.records
    assert set(records["tau_units"]) == {"resid_norm"}
    for rec in records.itertuples(index=False):
        assert rec.resid_norm == pytest.approx(norms[int(rec.layer)])
        before, after = reference_cell(
            gpt2,
            ROWS[int(rec.row_id)],
            layer=int(rec.layer),
            tau=float(rec.tau),
            memory_text=rec.memory,
            tau_units="resid_norm",
            resid_norm=float(rec.resid_norm),
        )
        assert rec.p_before == pytest.approx(before, rel=1e-4)
        assert math.log(rec.p_after) == pytest.approx(math.log(after), abs=1e-4)
    assert records["pct_change"].abs().max() > 1.0  # the injections matter


def test_shards_share_the_norms_of_the_whole_dataset(gpt2):
    config = dict(layers=(1,), taus=(0.5,), tau_units="resid_norm")
    whole = run_sweep(gpt2, ROWS, SweepConfig(**config)).stats["resid_norms"]
    part = run_sweep(gpt2, ROWS, SweepConfig(**config, shard=(1, 2))).stats["resid_norms"]
    assert part == whole


def test_a_norm_unit_memory_adds_a_vector_of_that_length(gpt2):
    table = {"name": "m", "text": "Paris", "layer": 1, "tau": 0.5, "site": "attn_out"}
    memory = {**table, "tau_units": "resid_norm", "resid_norm": 20.0}
    tokens = gpt2.to_tokens("The capital of France is")
    seen = {}

    def grab(key):
        def hook(activation, hook):
            seen[key] = activation.detach().clone()

        return hook

    with torch.no_grad():
        gpt2.bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_attn_out", grab("plain"))])
        with meminject.inject(gpt2, memory):
            gpt2.bridge.run_with_hooks(
                tokens, fwd_hooks=[("blocks.1.hook_attn_out", grab("memory"))]
            )
    gpt2.encodings.clear()
    added = (seen["memory"] - seen["plain"])[0]
    torch.testing.assert_close(added.norm(dim=-1), torch.full((tokens.shape[1],), 10.0))


def test_norm_units_are_checked():
    table = {"name": "m", "text": "Paris", "layer": 1, "tau": 0.5}
    with pytest.raises(
        MemoryFileError, match=r"field 'resid_norm': tau_units = 'resid_norm' needs"
    ):
        memories_from_tables({**table, "tau_units": "resid_norm"}, registry=get_registry())
    with pytest.raises(MemoryFileError, match=r"resid_norm is only used with"):
        memories_from_tables({**table, "resid_norm": 3.0}, registry=get_registry())
    with pytest.raises(BadInputError, match=r"unknown τ units 'norm'"):
        SweepConfig(layers=(0,), taus=(1.0,), tau_units="norm")


def test_resuming_with_other_units_is_refused(gpt2):
    absolute = run_sweep(gpt2, ROWS[:2], SweepConfig(layers=(1,), taus=(0.5,))).records
    with pytest.raises(
        BadInputError, match=r"other settings \(tau_units: \['absolute'\] instead of"
    ):
        run_sweep(
            gpt2,
            ROWS[:2],
            SweepConfig(layers=(1,), taus=(0.5,), tau_units="resid_norm"),
            done=absolute,
        )
    older = absolute.drop(columns=["tau_units", "resid_norm"])  # records from before units
    resumed = run_sweep(gpt2, ROWS[:2], SweepConfig(layers=(1,), taus=(0.5,)), done=older)
    assert resumed.stats["resumed_rows"] == 2
