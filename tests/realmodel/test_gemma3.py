"""Gemma 3 270M (real weights): BOS, the post-sublayer norms, and the fast path.

Gemma 3 normalises each attention and MLP output before adding it to the residual
stream. TransformerBridge's ``hook_attn_out``/``hook_mlp_out`` are those normalised
contributions (``resid_mid − resid_pre`` and ``resid_post − resid_mid``), while one
head's result is a summand of the attention's output *before* its norm
(``attn.hook_out``). These tests pin both facts, since the per-head lowering and the
plain-model hooks depend on them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meminject.errors import BadInputError
from meminject.generation import generate
from tests.conftest import write
from tests.realmodel.conftest import (
    assert_processing_matches_the_bridge,
    worst_log_error_against_reference,
)

pytestmark = pytest.mark.realmodel

EIFFEL = "The Eiffel Tower is located in the city of"


def _file(tmp_path: Path, body: str) -> Path:
    return write(tmp_path / "m.toml", "version = 1\n" + body)


def test_loads_with_bos_and_post_sublayer_norms(gemma3) -> None:
    assert gemma3.prepend_bos is True
    assert gemma3.tokenize(EIFFEL)[0] == gemma3.tokenizer.bos_token_id
    assert gemma3.post_sublayer_norms
    assert (gemma3.dims.n_layers, gemma3.dims.d_model, gemma3.dims.d_vocab) == (18, 640, 262144)
    for backend in ("bridge", "hf"):
        got = generate(gemma3, EIFFEL, max_new_tokens=4, backend=backend).completion
        assert got.startswith(" Paris, France"), (backend, got)


def test_attn_out_is_the_normalised_contribution_and_heads_sum_before_the_norm(gemma3) -> None:
    import torch

    tokens = gemma3.to_tokens(EIFFEL)
    names = [
        f"blocks.3.{n}"
        for n in (
            "hook_resid_pre",
            "hook_resid_mid",
            "hook_attn_out",
            "attn.hook_out",
            "attn.hook_result",
        )
    ]
    gemma3.bridge.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = gemma3.bridge.run_with_cache(tokens, names_filter=names)
    finally:
        gemma3.bridge.set_use_attn_result(False)
    c = {n.split(".", 2)[2]: cache[n] for n in names}
    stream = c["hook_resid_mid"] - c["hook_resid_pre"]
    torch.testing.assert_close(c["hook_attn_out"], stream, rtol=0, atol=1e-3)
    torch.testing.assert_close(c["attn.hook_result"].sum(2), c["attn.hook_out"], rtol=0, atol=1e-3)
    assert (c["attn.hook_out"] - c["hook_attn_out"]).abs().max() > 1.0


def test_per_head_memory_equals_editing_that_head(gemma3, tmp_path) -> None:
    import torch

    from meminject.engine import inject

    path = _file(
        tmp_path, '[[memory]]\nname = "h"\ntext = "Paris"\nlayer = 5\nhead = 2\ntau = 0.5\n'
    )
    tokens = gemma3.to_tokens(EIFFEL)
    with torch.no_grad():
        with inject(gemma3, path):
            via_memory = gemma3.bridge(tokens)
        (vector,) = gemma3.encodings.values()  # the memory's v, encoded once by inject
        vector = 0.5 * vector

        def edit(result, hook):
            result = result.clone()
            result[:, :, 2] += vector
            return result

        gemma3.bridge.set_use_attn_result(True)
        try:
            by_hand = gemma3.bridge.run_with_hooks(
                tokens, fwd_hooks=[("blocks.5.attn.hook_result", edit)]
            )
        finally:
            gemma3.bridge.set_use_attn_result(False)
        plain = gemma3.bridge(tokens)
    torch.testing.assert_close(via_memory, by_hand, rtol=1e-4, atol=1e-3)
    assert (via_memory - plain).abs().max() > 1e-2


SITES = {
    "attn_out": "",
    "mlp_out": "",
    "resid_mid": "",
    "attn_result": "head = 1\n",
}


@pytest.mark.parametrize("positions", ["all", "last", "generated"])
def test_bridge_and_hf_with_and_without_cache_give_identical_tokens(
    gemma3, tmp_path, positions
) -> None:
    body = "".join(
        f'[[memory]]\nname = "m{i}"\ntext = "Rome"\nlayer = {3 + 4 * i}\nsite = "{site}"\n'
        f'{extra}tau = 0.3\npositions = "{positions}"\n'
        for i, (site, extra) in enumerate(SITES.items())
    )
    path = _file(tmp_path, body)
    runs = {
        (backend, cache): generate(
            gemma3, EIFFEL, path, max_new_tokens=6, use_kv_cache=cache, backend=backend
        )
        for backend in ("bridge", "hf")
        for cache in (True, False)
    }
    assert {k: r.backend for k, r in runs.items()} == {k: k[0] for k in runs}
    tokens = {k: r.new_tokens for k, r in runs.items()}
    assert len({tuple(t) for t in tokens.values()}) == 1, tokens
    if positions == "all":  # the memories matter, or the equality proves nothing
        assert tokens[("hf", True)] != generate(gemma3, EIFFEL, max_new_tokens=6).new_tokens


def test_sweep_matches_the_reference_with_and_without_heads(gemma3) -> None:
    """Whole-layer cells add after the post-attention norm (the engine's attn_out); head
    cells route through the head's value mix, which Gemma normalises afterwards, so they
    go to attn.hook_out. Both agree with the reference loop, and a head cell agrees with
    a hand-made edit of hook_z."""
    import math

    import torch

    from meminject.datasets import PromptRow
    from meminject.heads import z_delta
    from meminject.sweep import SweepConfig, run_sweep, tokenize_row

    rows = [
        PromptRow(EIFFEL, "Paris", "Paris", None, 0),
        PromptRow("The capital city of Nepal is located in", "Kathmandu", "Kathmandu", None, 1),
    ]
    records = run_sweep(gemma3, rows, SweepConfig(layers=(4, 12), taus=(0.2,))).records
    assert worst_log_error_against_reference(gemma3, rows, records) < 1e-3
    assert records["pct_change"].abs().max() > 1.0
    heads = run_sweep(gemma3, rows, SweepConfig(layers=(4,), taus=(2.0,), heads=(0, 3))).records
    assert worst_log_error_against_reference(gemma3, rows, heads) < 1e-3
    assert heads["pct_change"].abs().max() > 1.0
    rec = heads[heads["head"] == 3].iloc[0]
    ids = list(dict.fromkeys(gemma3.tokenize(rec["memory"], prepend_bos=False)))
    dz = z_delta(gemma3, 4, 3, 2.0 * gemma3.bridge.W_U.detach()[:, ids].sum(-1))

    def edit(z, hook):
        z = z.clone()
        z[:, :, 3] += dz
        return z

    row = tokenize_row(gemma3, rows[int(rec["row_id"])])
    with torch.no_grad():
        logits = gemma3.bridge.run_with_hooks(
            torch.tensor([row.input_ids]), fwd_hooks=[("blocks.4.attn.hook_z", edit)]
        )
    logp = float(logits[0, row.read_positions[0]].double().log_softmax(-1)[row.targets[0]])
    assert math.isclose(logp, rec["logp_after"], abs_tol=1e-3)


def test_learned_local_memory_edits_its_prompt(gemma3, tmp_path) -> None:
    from meminject import learn as learning

    prompt = "The city of Tokyo lies in the country of"
    # One step is not enough on Gemma 3 (no step size makes ' Nepal' top-1 at layer 4's
    # attention output); four steps reach it (measured: p 1.1e-6 → 0.26, alpha ≈ 239).
    with pytest.raises(BadInputError, match="no step size"):
        learning.learn(gemma3, prompt, " Nepal", layer=4, site="attn_out", max_doublings=12)
    learned = learning.learn(gemma3, prompt, " Nepal", layer=4, site="attn_out", steps=4)
    # Gemma's attention outputs at one layer point nearly the same way at several
    # positions (x = 1 − a·k/‖k‖² was −0.05 and −0.003 at positions 3 and 4), so the
    # blog's boundary 0.25 also opens the gate there (measured: ' India' 0.21 first); a
    # boundary of 0.05 fires at the key alone.
    out, _ = learning.write_learned(
        tmp_path / "tokyo.toml", learned, gemma3, name="tokyo", boundary=0.05, hardness=3.0
    )
    base = generate(gemma3, prompt, max_new_tokens=0, show_top=1)
    edited = generate(gemma3, prompt, out, max_new_tokens=0, show_top=1)
    assert base.top_next[0].token != " Nepal"
    assert edited.top_next[0].token == " Nepal"
    assert learned.prob_before < learned.prob_after


def test_inspect_projects_layers_and_refuses_heads(gemma3) -> None:
    from meminject.lens import project_attention

    report = project_attention(gemma3, EIFFEL, layers=[2, 17], top_k=3, token=" Paris")
    assert [p.layer for p in report.projections] == [2, 17]
    assert all(len(p.top) == 3 for p in report.projections)
    with pytest.raises(BadInputError, match="--heads is not supported on model 'gemma3-270m'"):
        project_attention(gemma3, EIFFEL, layers=[2], heads=True)


def test_validate_checks_widths_against_gemma(gemma3, tmp_path) -> None:
    """`validate --model` on Gemma: a per-head memory compiles; a key of SmolLM2's width
    (576) is refused against Gemma's 640, naming the memory and field."""
    import torch
    from safetensors.torch import save_file

    from meminject.engine import compile_memories
    from meminject.errors import MemoryFileError
    from meminject.loading import load_memories

    good = _file(
        tmp_path, '[[memory]]\nname = "h"\ntext = "Paris"\nlayer = 5\nhead = 3\ntau = 0.5\n'
    )
    assert len(compile_memories(gemma3, load_memories([good]))) == 1
    save_file({"key": torch.ones(576), "delta": torch.ones(576)}, str(tmp_path / "g.safetensors"))
    bad = write(
        tmp_path / "bad.toml",
        'version = 1\n[[memory]]\nname = "narrow"\nstrategy = "gated"\nsite = "resid_post"\n'
        'layer = 2\ntensors = "g.safetensors"\nboundary = 0.1\nhardness = 3.0\n',
    )
    with pytest.raises(MemoryFileError) as info:
        compile_memories(gemma3, load_memories([bad]))
    assert "memory 'narrow'" in str(info.value) and "(640,)" in str(info.value)


def test_shipped_best_cell_memories_compile_and_raise_their_prompts_answer(gemma3) -> None:
    """memories/gemma3-270m/: the best cells of the reproduction (docs/reproducing.md)
    validate against Gemma 3, and the handwritten set's cell (the layer encoding at
    layer 12) raises p(" Revolutionary") on its dataset's first prompt, as the sweep's
    median prompt does."""
    import torch

    from meminject.engine import compile_memories, inject
    from meminject.loading import load_memories

    shipped = Path(__file__).resolve().parents[2] / "memories" / "gemma3-270m"
    memory_set = load_memories([shipped])
    names = sorted(entry.memory.name for entry in memory_set.entries)
    assert names == ["best-cell-2wiki", "best-cell-handwritten"]
    assert len(compile_memories(gemma3, memory_set)) == 2
    best = shipped / "best-cell-handwritten.toml"
    (entry,) = load_memories([best]).entries
    assert (entry.memory.encoding, entry.memory.layer, entry.memory.tau) == ("layer", 12, 1.0)
    tokens = gemma3.to_tokens("The first president of the United States fought in the")
    answer = gemma3.tokenize(" Revolutionary", prepend_bos=False)[0]
    with torch.no_grad():
        before = gemma3.bridge(tokens)[0, -1].log_softmax(-1)[answer]
        with inject(gemma3, best):
            after = gemma3.bridge(tokens)[0, -1].log_softmax(-1)[answer]
    assert float(after) > float(before)


def test_processing_without_transformer_lens_equals_the_bridges(gemma3) -> None:
    """meminject.processing on the real checkpoint: Gemma's 1 + w norms folded (and set to
    0), the post-sublayer norms and the scaled embedding left alone, tied embeddings
    untied; the bridge's processed tensors and logits."""
    assert_processing_matches_the_bridge(gemma3, "The capital of France is", "rms_offset")
