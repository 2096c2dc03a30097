"""Encoders and the add strategy on tiny real models (docs/architecture.md#semantics)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meminject.engine import compile_memories, inject
from meminject.errors import BadInputError
from meminject.generation import generate
from meminject.loading import load_memories
from tests.conftest import write

pytestmark = pytest.mark.integration

PROMPT = "The first president of the United States fought in the"


def memory_file(tmp_path: Path, body: str, name: str = "m.toml") -> Path:
    return write(tmp_path / name, "version = 1\n\n" + body)


def one_memory(tmp_path: Path, **fields: object) -> Path:
    lines = ["[[memory]]", 'name = "m"']
    for key, value in fields.items():
        rendered = (
            f'"{value}"'
            if isinstance(value, str)
            else str(value).lower()
            if isinstance(value, bool)
            else repr(value)
        )
        lines.append(f"{key} = {rendered}")
    return memory_file(tmp_path, "\n".join(lines) + "\n")


def encoded(model, path: Path) -> torch.Tensor:
    memory_set = load_memories([path])
    compile_memories(model, memory_set)
    assert len(model.encodings) == 1
    return next(iter(model.encodings.values()))


def test_unembed_is_sum_of_distinct_unembedding_columns(gpt2, tmp_path):
    # " Washington" appears twice: the multi-hot rule counts it once.
    text = "George Washington Washington"
    ids = gpt2.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 3 and ids[1] == ids[2]
    v = encoded(gpt2, one_memory(tmp_path, text=text, layer=1, tau=1.0, encoding="unembed"))
    w_u = gpt2.bridge.W_U.detach()
    expected = w_u[:, ids[0]] + w_u[:, ids[1]]
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(v, expected + w_u[:, ids[2]])


def test_embed_is_sum_of_distinct_embedding_rows(gpt2, tmp_path):
    text = "France Paris Paris"
    ids = list(dict.fromkeys(gpt2.tokenizer.encode(text, add_special_tokens=False)))
    assert len(ids) == 2
    v = encoded(gpt2, one_memory(tmp_path, text=text, layer=0, tau=1.0, encoding="embed"))
    w_e = gpt2.bridge.W_E.detach()
    torch.testing.assert_close(v, w_e[ids[0]] + w_e[ids[1]], rtol=0, atol=1e-6)


def test_layer_encoder_is_attention_output_at_last_token(gpt2, tmp_path):
    text = "George Washington"
    v = encoded(gpt2, one_memory(tmp_path, text=text, layer=1, tau=1.0, encoding="layer"))
    tokens = gpt2.bridge.to_tokens(text)  # BOS prepended, as for prompts
    _, cache = gpt2.bridge.run_with_cache(tokens)
    torch.testing.assert_close(v, cache["blocks.1.hook_attn_out"][0, -1], rtol=0, atol=1e-5)


def test_encodings_are_computed_once_per_memory_and_model(gpt2, tmp_path):
    path = one_memory(tmp_path, text="George Washington", layer=1, tau=2.0)
    compile_memories(gpt2, load_memories([path]))
    first = next(iter(gpt2.encodings.values()))
    compile_memories(gpt2, load_memories([path]))
    assert len(gpt2.encodings) == 1
    assert next(iter(gpt2.encodings.values())) is first


def test_processed_unembed_matches_folded_centred_formula(gpt2, gpt2_raw, tmp_path):
    """Processed coordinates are HookedTransformer's: fold ln_f's weight into lm_headᵀ,
    centre the folded reading weights over d_model (LayerNorm output has zero mean), then
    centre over the vocabulary. The LN weights here are not 1, so raw differs."""
    hf = gpt2_raw.bridge.original_model
    ln_w = hf.transformer.ln_f.weight.detach()
    assert not torch.allclose(ln_w, torch.ones_like(ln_w))
    w_raw = hf.lm_head.weight.detach().T  # d_model × d_vocab
    w_folded = ln_w[:, None] * w_raw
    w_folded = w_folded - w_folded.mean(dim=0, keepdim=True)
    w_processed = w_folded - w_folded.mean(dim=-1, keepdim=True)
    text = "George Washington"
    ids = gpt2.tokenizer.encode(text, add_special_tokens=False)
    path = one_memory(tmp_path, text=text, layer=1, tau=1.0)
    v_processed = encoded(gpt2, path)
    v_raw = encoded(gpt2_raw, path)
    torch.testing.assert_close(v_processed, w_processed[:, ids].sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_raw, w_raw[:, ids].sum(-1), rtol=0, atol=1e-6)
    assert (v_processed - v_raw).abs().max() > 1e-2


def test_processed_and_raw_models_predict_the_same(gpt2, gpt2_raw):
    tokens = gpt2.to_tokens(PROMPT)
    with torch.no_grad():
        a = gpt2.bridge(tokens).log_softmax(-1)
        b = gpt2_raw.bridge(tokens).log_softmax(-1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (
        generate(gpt2, PROMPT, max_new_tokens=8).new_tokens
        == generate(gpt2_raw, PROMPT, max_new_tokens=8).new_tokens
    )


def test_add_at_attn_out_matches_manual_hook(gpt2, tmp_path):
    path = one_memory(tmp_path, text="George Washington", layer=1, tau=3.0, site="attn_out")
    tokens = gpt2.to_tokens(PROMPT)
    v = encoded(gpt2, path)
    with torch.no_grad(), inject(gpt2, path):
        injected = gpt2.bridge(tokens)
    with torch.no_grad():
        manual = gpt2.bridge.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_attn_out", lambda a, hook: a + 3.0 * v)]
        )
        plain = gpt2.bridge(tokens)
    torch.testing.assert_close(injected, manual, rtol=0, atol=1e-6)
    assert (injected - plain).abs().max() > 1e-3


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post", "mlp_out"])
def test_add_at_layer_sites_matches_manual_hook(gpt2, tmp_path, site):
    path = one_memory(tmp_path, text="Paris", layer=1, tau=2.0, site=site, encoding="embed")
    hook = {
        "resid_pre": "blocks.1.hook_resid_pre",
        # resid_mid = resid_pre + attn_out: adding to it is adding to the attention output
        # (the bridge's own hook_resid_mid is the LayerNorm's input, see the test below).
        "resid_mid": "blocks.1.hook_attn_out",
        "resid_post": "blocks.1.hook_resid_post",
        "mlp_out": "blocks.1.hook_mlp_out",
    }[site]
    tokens = gpt2.to_tokens(PROMPT)
    v = encoded(gpt2, path)
    with torch.no_grad(), inject(gpt2, path):
        injected = gpt2.bridge(tokens)
    with torch.no_grad():
        manual = gpt2.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, hook: a + 2.0 * v)])
    torch.testing.assert_close(injected, manual, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_resid_mid_memory_changes_the_residual_stream_itself(model_dirs, tmp_path, arch):
    """a ← a + τ·v at resid_mid (docs/architecture.md#sites). The bridge's hook_resid_mid is the
    second LayerNorm's input, so a change made there reaches the MLP but not the stream;
    the engine lowers it so that the stream after the block carries τ·v as well:
    resid_post − mlp_out (= resid_mid) moves by exactly τ·v."""
    from meminject.loading import load_model

    model = load_model(model_dirs[arch])
    path = one_memory(tmp_path, text="Paris", layer=1, tau=2.0, site="resid_mid", encoding="embed")
    v = encoded(model, path)
    tokens = model.to_tokens(PROMPT)
    names = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid"]
    with torch.no_grad():
        _, before = model.bridge.run_with_cache(tokens, names_filter=names)
        with inject(model, path):
            _, after = model.bridge.run_with_cache(tokens, names_filter=names)

    def mid(cache):
        return cache["blocks.1.hook_resid_post"] - cache["blocks.1.hook_mlp_out"]

    torch.testing.assert_close(
        mid(after) - mid(before), (2.0 * v).expand_as(mid(after)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(after["blocks.1.hook_resid_mid"], mid(after), atol=1e-5, rtol=0)
    assert (after["blocks.1.hook_mlp_out"] - before["blocks.1.hook_mlp_out"]).abs().max() > 1e-3


def test_resid_mid_is_refused_on_a_parallel_block_model(model_dirs, tmp_path):
    from meminject.loading import load_model

    model = load_model(model_dirs["neox"])
    path = one_memory(tmp_path, text="Paris", layer=1, tau=2.0, site="resid_mid")
    with (
        pytest.raises(BadInputError, match="in parallel, so it has no resid_mid"),
        inject(model, path),
    ):
        pass


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_head_result_injection_equals_attention_output_injection(model_dirs, tmp_path, arch):
    """Adding v to one head's result (through the per-head hook point) adds exactly v to
    the layer's attention output; the engine relies on this to avoid per-head results."""
    from meminject.loading import load_model

    model = load_model(model_dirs[arch])
    head_file = one_memory(tmp_path / "h", text="George Washington", layer=1, head=2, tau=4.0)
    out_file = one_memory(
        tmp_path / "o", text="George Washington", layer=1, tau=4.0, site="attn_out"
    )
    tokens = model.to_tokens(PROMPT)
    v = encoded(model, head_file)

    def add_to_head(result, hook):
        result = result.clone()
        result[:, :, 2] += 4.0 * v
        return result

    with torch.no_grad():
        plain = model.bridge(tokens)
        model.bridge.set_use_attn_result(True)
        try:
            per_head = model.bridge.run_with_hooks(
                tokens, fwd_hooks=[("blocks.1.attn.hook_result", add_to_head)]
            )
        finally:
            model.bridge.set_use_attn_result(False)
        with inject(model, out_file):
            via_out = model.bridge(tokens)
        with inject(model, head_file):
            via_engine = model.bridge(tokens)
    torch.testing.assert_close(per_head, via_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_engine, per_head, rtol=1e-5, atol=1e-5)
    assert (per_head - plain).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_memory_routed_through_a_head_equals_editing_that_heads_value_mix(
    model_dirs, tmp_path, arch
):
    """site = "attn_z" with a head: the head's value mix moves by τ·v·pinv(W_O[h]), made
    here by hand on ``attn.hook_z``; the engine's lowering onto the attention output must
    give the same logits. Unlike ``attn_result``, heads then differ."""
    from meminject.heads import written_share, z_delta
    from meminject.loading import load_model

    model = load_model(model_dirs[arch])
    tokens = model.to_tokens(PROMPT)
    results = {}
    for head in (0, 2):
        path = one_memory(
            tmp_path / f"z{head}",
            text="George Washington",
            layer=1,
            head=head,
            tau=4.0,
            site="attn_z",
        )
        model.encodings.clear()
        v = encoded(model, path)
        dz = z_delta(model, 1, head, 4.0 * v)

        def edit(z, hook, head=head, dz=dz):
            z = z.clone()
            z[:, :, head] += dz
            return z

        with torch.no_grad():
            by_hand = model.bridge.run_with_hooks(
                tokens, fwd_hooks=[("blocks.1.attn.hook_z", edit)]
            )
            with inject(model, path):
                via_engine = model.bridge(tokens)
        torch.testing.assert_close(via_engine, by_hand, rtol=1e-5, atol=1e-5)
        # d_head 16 of d_model 64: a head writes part of the memory, not all of it.
        assert 0.0 < written_share(model, 1, head, v) < 1.0
        results[head] = via_engine
    with torch.no_grad():
        plain = model.bridge(tokens)
    assert (results[0] - plain).abs().max() > 1e-3
    assert (results[0] - results[2]).abs().max() > 1e-3  # the heads differ


def test_attn_z_needs_a_head_and_head_needs_a_head_site(tmp_path):
    from meminject.errors import MemoryFileError
    from meminject.loading import load_memories

    no_head = one_memory(tmp_path / "a", text="x", layer=1, tau=1.0, site="attn_z")
    with pytest.raises(MemoryFileError, match="site 'attn_z' needs a 'head'"):
        load_memories([no_head])
    wrong = one_memory(tmp_path / "b", text="x", layer=1, tau=1.0, site="mlp_out", head=1)
    with pytest.raises(MemoryFileError, match="only valid with site 'attn_result' or 'attn_z'"):
        load_memories([wrong])


POSITION_MODES = ["all", "prompt", "generated", "last", [1, 3, -1], [-2, 12, 14]]


@pytest.mark.parametrize("positions", POSITION_MODES, ids=str)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_on_and_off_give_identical_tokens(model_dirs, tmp_path, positions, arch):
    from meminject.loading import load_model

    model = load_model(model_dirs[arch])
    lines = [
        "[[memory]]",
        'name = "m"',
        'text = "George Washington"',
        "layer = 1",
        "tau = 6.0",
        f"positions = {positions!r}".replace("'", '"'),
    ]
    path = memory_file(tmp_path, "\n".join(lines) + "\n")
    cached = generate(model, PROMPT, path, max_new_tokens=12, use_kv_cache=True, stop_at_eos=False)
    uncached = generate(
        model, PROMPT, path, max_new_tokens=12, use_kv_cache=False, stop_at_eos=False
    )
    baseline = generate(model, PROMPT, max_new_tokens=12, stop_at_eos=False)
    assert cached.new_tokens == uncached.new_tokens
    assert len(cached.new_tokens) == 12
    # The memory must matter, or equality proves nothing.
    assert cached.new_tokens != baseline.new_tokens


def test_positions_select_exactly_the_named_tokens(gpt2, tmp_path):
    """Only the chosen absolute positions change at the site (checked on hook_attn_out)."""
    tokens = gpt2.to_tokens(PROMPT)
    n = tokens.shape[1]
    expected = {
        "all": set(range(n)),
        "prompt": set(range(n)),
        "last": {n - 1},
        "generated": set(),
        "[0, -2]": {0, n - 2},
    }
    for mode, rows in expected.items():
        value = mode if mode.startswith("[") else f'"{mode}"'
        path = memory_file(
            tmp_path / mode.strip("[]").replace(", ", "_"),
            f'[[memory]]\nname = "m"\ntext = "Paris"\nlayer = 0\ntau = 1.0\n'
            f'site = "attn_out"\npositions = {value}\n',
        )
        seen = {}

        def grab(a, hook, store=seen):
            store["a"] = a.detach().clone()

        with torch.no_grad():
            gpt2.bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_mid", grab)])
            before = seen["a"]
            with inject(gpt2, path):
                gpt2.bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_mid", grab)])
        changed = {int(p) for p in ((seen["a"] - before).abs().amax(-1)[0] > 0).nonzero()}
        assert changed == rows, mode


@pytest.mark.parametrize("switch", ["enabled = false", "tau = 0.0"])
def test_disabled_or_zero_tau_memory_leaves_logits_bit_identical(gpt2, tmp_path, switch):
    fields = 'name = "m"\ntext = "George Washington"\nlayer = 1\nhead = 0\n'
    body = fields + ("tau = 5.0\n" + switch if switch.startswith("enabled") else switch)
    path = memory_file(tmp_path, "[[memory]]\n" + body + "\n")
    tokens = gpt2.to_tokens(PROMPT)
    with torch.no_grad():
        plain = gpt2.bridge(tokens)
        with inject(gpt2, path):
            with_memory = gpt2.bridge(tokens)
    assert torch.equal(plain, with_memory)


def test_no_hook_remains_after_an_exception_inside_generation(gpt2, tmp_path):
    path = one_memory(tmp_path, text="George Washington", layer=1, head=1, tau=3.0)
    tokens = gpt2.to_tokens(PROMPT)

    def live_hooks() -> int:
        return sum(len(hp.fwd_hooks) for hp in gpt2.bridge.hook_dict.values())

    before = live_hooks()
    with torch.no_grad():
        plain = gpt2.bridge(tokens)
    boom = RuntimeError("interrupted")

    def explode(a, hook):
        raise boom

    with pytest.raises(RuntimeError, match="interrupted"), inject(gpt2, path):
        assert live_hooks() > before
        gpt2.bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", explode)])
    assert live_hooks() == before
    assert not getattr(gpt2.bridge.cfg, "use_attn_result", False)
    with torch.no_grad():
        assert torch.equal(gpt2.bridge(tokens), plain)


def test_generation_raising_midway_restores_hooks(gpt2, tmp_path, monkeypatch):
    from meminject import generation

    path = one_memory(tmp_path, text="George Washington", layer=1, tau=3.0)
    calls = {"n": 0}
    real_pick = generation._step_row

    def failing_pick(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_pick(*args, **kwargs)

    monkeypatch.setattr(generation, "_step_row", failing_pick)
    with pytest.raises(KeyboardInterrupt):
        generate(gpt2, PROMPT, path, max_new_tokens=10)
    assert sum(len(hp.fwd_hooks) for hp in gpt2.bridge.hook_dict.values()) == 0


def test_sampling_is_reproducible_with_a_seed(gpt2, tmp_path):
    path = one_memory(tmp_path, text="George Washington", layer=1, tau=3.0)
    a = generate(gpt2, PROMPT, path, max_new_tokens=10, temperature=1.0, seed=7)
    b = generate(gpt2, PROMPT, path, max_new_tokens=10, temperature=1.0, seed=7)
    c = generate(gpt2, PROMPT, path, max_new_tokens=10, temperature=1.0, seed=8)
    assert a.new_tokens == b.new_tokens
    assert a.new_tokens != c.new_tokens


def test_top_next_tokens_are_the_softmax_of_the_last_logits(gpt2):
    result = generate(gpt2, PROMPT, max_new_tokens=1, show_top=3)
    with torch.no_grad():
        probs = gpt2.bridge(gpt2.to_tokens(PROMPT))[0, -1].softmax(-1)
    values, ids = probs.topk(3)
    assert [t.token_id for t in result.top_next] == ids.tolist()
    assert [t.prob for t in result.top_next] == pytest.approx(values.tolist(), abs=1e-6)
    assert result.new_tokens[0] == ids[0].item()


def test_memory_set_from_directory_and_files_mixed(gpt2, tmp_path):
    a = memory_file(
        tmp_path / "d", '[[memory]]\nname = "a"\ntext = "Paris"\nlayer = 0\ntau = 1.0\n', "a.toml"
    )
    memory_file(
        tmp_path / "d" / "sub",
        '[[memory]]\nname = "b"\ntext = "Rome"\nlayer = 1\ntau = 1.0\n',
        "b.toml",
    )
    c = memory_file(
        tmp_path, '[[memory]]\nname = "c"\ntext = "Oslo"\nlayer = 1\ntau = 1.0\n', "c.toml"
    )
    memory_set = load_memories([tmp_path / "d", c, a])
    assert [e.name for e in memory_set.entries] == ["a", "b", "c"]
    hooks = compile_memories(gpt2, memory_set)
    assert sorted(h.hook.hook_name for h in hooks) == [
        "blocks.0.hook_attn_out",
        "blocks.1.hook_attn_out",
    ]


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_bridge_cached_step_gives_the_uncached_logits(model_dirs, arch):
    """One cached decoding step through the bridge must see every earlier token.

    Tokens alone cannot show this on random tiny models (their greedy tokens often
    coincide), so the logits are compared: with transformers 5.24 the bridge's Llama
    attention never filled the cache and this differed by 0.6 (pyproject pins < 5.24).
    """
    import torch

    from meminject.loading import load_model

    model = load_model(model_dirs[arch])
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        full = model.bridge(tokens, return_type="logits")[0, -1]
        _, past = model.bridge(
            tokens[:, :-1], return_type="logits_and_cache", past_key_values=None, use_cache=True
        )
        step, _ = model.bridge(
            tokens[:, -1:], return_type="logits_and_cache", past_key_values=past, use_cache=True
        )
    torch.testing.assert_close(step[0, -1], full, rtol=1e-4, atol=1e-4)
