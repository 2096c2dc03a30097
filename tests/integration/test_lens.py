"""The head latent space projector (``meminject inspect``) against an independent
projection of ``run_with_cache`` activations through ``W_U``."""

from __future__ import annotations

import json

import click
import pytest
import torch
from click.testing import CliRunner

from meminject.cli import _Group
from meminject.cli.inspect import inspect as inspect_command
from meminject.errors import BadInputError
from meminject.lens import project_attention

pytestmark = pytest.mark.integration

PROMPT = "The capital of the country north of Spain is"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _independent(model, heads: bool):
    bridge = model.bridge
    bridge.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = bridge.run_with_cache(model.to_tokens(PROMPT))
    finally:
        bridge.set_use_attn_result(False)
    w_u = bridge.W_U.detach()
    out = {}
    for layer in range(model.dims.n_layers):
        out[(layer, None)] = cache[f"blocks.{layer}.hook_attn_out"][0, -1] @ w_u
        if heads:
            result = cache[f"blocks.{layer}.attn.hook_result"][0, -1]
            for head in range(model.dims.n_heads):
                out[(layer, head)] = result[head] @ w_u
    return out


def test_top_k_equals_an_independent_projection(gpt2):
    report = project_attention(gpt2, PROMPT, heads=True, top_k=7, token=" Paris")
    expected = _independent(gpt2, heads=True)
    assert len(report.projections) == gpt2.dims.n_layers * (1 + gpt2.dims.n_heads)
    target = gpt2.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    for p in report.projections:
        logits = expected[(p.layer, p.head)]
        values, ids = logits.topk(7)
        assert [t.token_id for t in p.top] == ids.tolist()
        assert [t.logit for t in p.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert p.top[0].token == gpt2.tokenizer.decode([ids[0].item()])
        assert p.rank == int((logits > logits[target]).sum()) + 1
        assert p.logit == pytest.approx(float(logits[target]), abs=1e-4)
    assert report.position == gpt2.to_tokens(PROMPT).shape[1] - 1
    assert not getattr(gpt2.bridge.cfg, "use_attn_result", False)  # restored


def test_layer_selection_and_no_heads(gpt2):
    report = project_attention(gpt2, PROMPT, layers=[1], top_k=3)
    assert [(p.layer, p.head) for p in report.projections] == [(1, None)]
    assert report.projections[0].rank is None


def test_final_norm_would_not_change_ranks_in_processed_coordinates(gpt2):
    """Why the projection leaves ln_final out (lens module docstring): in processed
    coordinates W_U is centred over d_model and ln_final only centres and rescales."""
    report = project_attention(gpt2, PROMPT, top_k=5)
    expected = _independent(gpt2, heads=False)
    w_u = gpt2.bridge.W_U.detach()
    assert w_u.sum(0).abs().max() < 1e-4
    with torch.no_grad():
        _, cache = gpt2.bridge.run_with_cache(gpt2.to_tokens(PROMPT))
        for p in report.projections:
            normed = gpt2.bridge.ln_final(cache[f"blocks.{p.layer}.hook_attn_out"][:, -1:])
            assert (normed[0, 0] @ w_u).topk(5).indices.tolist() == [t.token_id for t in p.top]
            assert expected[(p.layer, None)].topk(5).indices.tolist() == [t.token_id for t in p.top]


def test_a_token_must_be_a_single_token(gpt2):
    with pytest.raises(BadInputError, match="is 2 tokens"):
        project_attention(gpt2, PROMPT, token=" Stratford")
    with pytest.raises(BadInputError, match="layer 5 is out of range"):
        project_attention(gpt2, PROMPT, layers=[5])


def _group() -> click.Group:
    group = _Group(name="meminject")
    group.add_command(inspect_command)
    return group


def test_cli_inspect_table_json_and_heatmap(gpt2, gpt2_dir, tmp_path):
    runner = CliRunner()
    png = tmp_path / "ranks.png"
    args = ["inspect", PROMPT, "--model", str(gpt2_dir), "--heads", "--token", " Paris"]
    result = runner.invoke(_group(), [*args, "--plot", str(png)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "rank of ' Paris'" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(_group(), [*args, "--json", "--show-top", "2", "--layers", "1"])
    payload = json.loads(result.output)
    report = project_attention(gpt2, PROMPT, layers=[1], heads=True, top_k=2, token=" Paris")
    assert payload["projections"] == report.to_dict()["projections"]
    refused = runner.invoke(_group(), [*args, "--plot", str(png)])
    assert refused.exit_code == 2 and "exists; pass --force" in refused.output
    usage = runner.invoke(_group(), ["inspect", PROMPT, "--plot", str(tmp_path / "x.png")])
    assert usage.exit_code == 2 and "--token" in usage.output


def test_token_text_follows_the_prompt_as_learn_and_evaluate_read_it(gpt2):
    """One rule (issue 29): 'Paris' means ' Paris' unless it starts with whitespace."""
    bare = project_attention(gpt2, PROMPT, layers=[1], token="Paris")
    spaced = project_attention(gpt2, PROMPT, layers=[1], token=" Paris")
    assert bare.token_id == spaced.token_id == gpt2.tokenize(" Paris", prepend_bos=False)[0]
    from meminject.learn import target_tokens

    assert target_tokens(gpt2, "Paris") == gpt2.continuation_ids(" Paris")


def test_cli_inspect_heads_takes_a_spec(gpt2_dir):
    runner = CliRunner()
    args = ["inspect", PROMPT, "--model", str(gpt2_dir), "--layers", "1", "--json"]
    some = json.loads(runner.invoke(_group(), [*args, "--heads", "0,2"]).output)
    every = json.loads(runner.invoke(_group(), [*args, "--heads"]).output)
    none = json.loads(runner.invoke(_group(), args).output)
    assert [p["head"] for p in some["projections"]] == [None, 0, 2]
    assert [p["head"] for p in every["projections"]] == [None, 0, 1, 2, 3]
    assert [p["head"] for p in none["projections"]] == [None]
    bad = runner.invoke(_group(), [*args, "--heads", "9"])
    assert bad.exit_code == 2 and "head 9" in bad.output
