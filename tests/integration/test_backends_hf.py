"""The hf backend (meminject.backends.hf) against the TransformerBridge path.

The bridge path is the reference: for every site, architecture and coordinates, the
plain Hugging Face model with hooks at the memories' sites must read the same
activations, produce the same logits and generate the same tokens, while holding no
weight tensor of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meminject.backends import BackendUnavailable, Step, get_backend
from meminject.engine import CompiledHook, chained_bodies, compile_memories, group_by_hook, inject
from meminject.errors import BadInputError
from meminject.extension import InjectionContext, SiteHook
from meminject.generation import generate
from meminject.schema import SITE_HOOKS
from tests.conftest import write
from tests.integration.test_gated import gated_file

pytestmark = pytest.mark.integration

PROMPT = "The first president of the United States fought in the"
READ_SITES = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_z", "mlp_post"]
ADD_SITES = ["attn_result", "attn_out", "resid_pre", "resid_mid", "resid_post", "mlp_out"]


@pytest.fixture(scope="module")
def models(model_dirs):
    """Each tiny architecture in both coordinate systems, loaded once for this module."""
    from meminject.loading import load_model

    return {
        (arch, coords): load_model(model_dirs[arch], coordinates=coords, bridge=True)
        for arch in ("gpt2", "neox", "llama")
        for coords in ("processed", "raw")
    }


def add_memory(tmp_path: Path, site: str, positions: str = '"all"', tau: float = 6.0) -> Path:
    head = "head = 2\n" if site == "attn_result" else ""
    return write(
        tmp_path / f"{site}.toml",
        f'version = 1\n[[memory]]\nname = "m"\ntext = "Paris Rome"\nlayer = 1\n'
        f'site = "{site}"\n{head}tau = {tau}\npositions = {positions}\n',
    )


def both_logits(model, memories) -> tuple[torch.Tensor, torch.Tensor]:
    """First-forward log-probabilities from the bridge (inject) and the plain model."""
    tokens = model.to_tokens(PROMPT)
    compiled = compile_memories(model, memories)
    plain = get_backend(model, "hf")
    ctx = InjectionContext(prompt_len=tokens.shape[1])
    with torch.no_grad():
        with inject(model, compiled, context=ctx):
            bridge = model.bridge(tokens, return_type="logits")
        with plain.hooks(chained_bodies(group_by_hook(compiled), ctx)):
            fast, _ = plain.forward(Step(tokens, use_cache=False))
    return torch.log_softmax(bridge[0].float(), -1), torch.log_softmax(fast[0].float(), -1)


def baseline_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model.bridge(model.to_tokens(PROMPT))[0].float(), -1)


@pytest.mark.parametrize("coords", ["processed", "raw"])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_every_site_reads_what_the_bridge_reads(models, arch, coords):
    model = models[(arch, coords)]
    plain = get_backend(model, "hf")
    assert plain.logits_error is not None and plain.logits_error < 1e-4
    for site in READ_SITES:
        name = SITE_HOOKS[site].format(layer=1)
        if arch == "neox" and site == "resid_mid":
            with pytest.raises(BackendUnavailable, match="parallel"):
                plain.site_map(name)
            continue
        site_map = plain.site_map(name)
        assert site_map.error < 1e-4, (site, site_map)
        # The plain model computes with the bridge's own (processed or raw) tensors, so
        # every site that writes the stream reads the bridge's numbers as they are.
        if site in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            assert site_map.kind == "identity", (site, site_map.kind)


@pytest.mark.parametrize("coords", ["processed", "raw"])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_the_plain_model_holds_no_weights_of_its_own(models, arch, coords):
    """One copy of the weights: every parameter and buffer of the plain model is a
    tensor the bridge already holds (the same storage), and building it changed none of
    the bridge's numbers."""
    model = models[(arch, coords)]
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        before = model.bridge(tokens, return_type="logits")
    plain = get_backend(model, "hf")
    bridge_storage = {t.untyped_storage().data_ptr() for t in model.bridge.parameters()}
    bridge_storage |= {t.untyped_storage().data_ptr() for t in model.bridge.buffers()}
    plain_tensors = [*plain.hf.parameters(), *plain.hf.buffers()]
    assert plain_tensors
    assert all(t.untyped_storage().data_ptr() in bridge_storage for t in plain_tensors)
    with torch.no_grad():
        after = model.bridge(tokens, return_type="logits")
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    ("arch", "site"),
    # GPT-NeoX runs attention and MLP in parallel: it has no resid_mid (refused, tested
    # in test_engine).
    [
        (a, s)
        for a in ("gpt2", "neox", "llama")
        for s in ADD_SITES
        if (a, s) != ("neox", "resid_mid")
    ],
)
def test_add_memory_gives_the_bridge_logits(models, tmp_path, arch, site):
    model = models[(arch, "processed")]
    bridge, fast = both_logits(model, add_memory(tmp_path, site))
    assert (bridge - baseline_logits(model)).abs().max() > 1e-2  # the memory does something
    torch.testing.assert_close(fast, bridge, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "site", ["resid_pre", "resid_mid", "attn_out", "mlp_out", "attn_z", "mlp_post"]
)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gated_memory_gate_fires_the_same_on_both_paths(models, tmp_path, arch, site):
    """The key is the bridge's own activation at the last prompt token, so the gate is
    open there and shut elsewhere only if the plain model reads the site in the bridge's
    coordinates (a centring or value-bias offset left out would move every gate)."""
    model = models[(arch, "processed")]
    name = SITE_HOOKS[site].format(layer=1)
    store = {}
    with torch.no_grad():
        model.bridge.run_with_hooks(
            model.to_tokens(PROMPT), fwd_hooks=[(name, lambda a, hook: store.setdefault("a", a))]
        )
    key = store["a"][0, -1].reshape(model.site_shape(site)).clone()
    delta = torch.randn(key.shape, generator=torch.Generator().manual_seed(3)) * 4.0
    path = gated_file(tmp_path, [("g", key, delta, 0.05, 3.0)], site=site, layer=1)
    bridge, fast = both_logits(model, path)
    changed = (bridge - baseline_logits(model)).abs().amax(-1)
    assert changed[-1] > 1e-2  # the gate fired at the keyed position
    torch.testing.assert_close(fast, bridge, rtol=0, atol=1e-4)


POSITION_SETS = ['"all"', '"prompt"', '"generated"', '"last"', "[1, -1]"]


@pytest.mark.parametrize("positions", POSITION_SETS)
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_generation_gives_the_bridge_tokens(models, tmp_path, arch, positions):
    model = models[(arch, "processed")]
    sites = [
        s
        for s in ("attn_result", "resid_pre", "resid_mid", "mlp_out")
        if arch != "neox" or s != "resid_mid"
    ]
    body = "version = 1\n"
    for i, site in enumerate(sites):
        head = "head = 1\n" if site == "attn_result" else ""
        body += (
            f'[[memory]]\nname = "m{i}"\ntext = "Paris Rome"\nlayer = {i % 2}\n'
            f'site = "{site}"\n{head}tau = 5.0\npositions = {positions}\n'
        )
    path = write(tmp_path / "set.toml", body)
    baseline = generate(model, PROMPT, None, max_new_tokens=10, stop_at_eos=False, backend="bridge")
    runs = {
        (backend, cache): generate(
            model,
            PROMPT,
            path,
            max_new_tokens=10,
            stop_at_eos=False,
            use_kv_cache=cache,
            backend=backend,
        )
        for backend in ("bridge", "hf")
        for cache in (True, False)
    }
    assert {key: run.backend for key, run in runs.items()} == {key: key[0] for key in runs}
    tokens = {key: run.new_tokens for key, run in runs.items()}
    assert len({tuple(t) for t in tokens.values()}) == 1, tokens
    assert tokens[("hf", True)] != baseline.new_tokens  # the memories change the output


def test_auto_backend_uses_the_plain_model_and_falls_back_with_a_reason(models, tmp_path):
    model = models[("gpt2", "processed")]
    path = add_memory(tmp_path, "attn_out")
    assert generate(model, PROMPT, path, max_new_tokens=3).backend == "hf"

    # A hook point the plain model cannot serve (per-head results) goes to the bridge.
    def push(activation, ctx):
        return activation + 1.0

    per_head = [
        CompiledHook(SiteHook("blocks.1.attn.hook_result", push, needs_attn_result=True), "t", "t")
    ]
    auto = generate(model, PROMPT, per_head, max_new_tokens=3)
    assert auto.backend == "bridge"
    assert "blocks.1.attn.hook_result" in (auto.backend_note or "")
    with pytest.raises(BadInputError, match="hf backend cannot run this"):
        generate(model, PROMPT, per_head, max_new_tokens=3, backend="hf")
    with pytest.raises(BadInputError, match="unknown backend"):
        generate(model, PROMPT, path, max_new_tokens=3, backend="fast")


def test_bridge_handed_in_without_a_checkpoint_runs_on_hf(models):
    """The plain model is built from the bridge's own modules, so a bridge handed in
    (no checkpoint directory behind it) still gets the fast path."""
    from meminject.model_handle import LoadedModel

    source = models[("gpt2", "processed")]
    bare = LoadedModel(
        bridge=source.bridge, name="handed-in", coordinates="processed", source="handed-in"
    )
    result = generate(bare, PROMPT, None, max_new_tokens=3)
    assert result.backend == "hf"
    assert result.new_tokens == generate(source, PROMPT, None, max_new_tokens=3).new_tokens


def test_hooks_are_removed_from_the_plain_model(models, tmp_path):
    model = models[("llama", "processed")]
    plain = get_backend(model, "hf")
    tokens = model.to_tokens(PROMPT)

    def installed():  # transformers installs output-capturing hooks of its own; ours go
        return {
            (name, key)
            for name, m in plain.hf.named_modules()
            for key in [*m._forward_hooks, *m._forward_pre_hooks]
        }

    with torch.no_grad():
        before, _ = plain.forward(Step(tokens, use_cache=False))
        transformers_own = installed()
        generate(model, PROMPT, add_memory(tmp_path, "resid_mid"), max_new_tokens=3)
        assert installed() == transformers_own
        hooks = plain.hooks({"blocks.0.hook_resid_pre": lambda a: a + 1.0})
        with pytest.raises(RuntimeError, match="boom"), hooks:
            raise RuntimeError("boom")
        after, _ = plain.forward(Step(tokens, use_cache=False))
    assert torch.equal(before, after)
    assert installed() == transformers_own


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_building_the_plain_model_keeps_the_fingerprint(model_dirs, arch):
    """The fused QKV tensor is rewritten in place; the fingerprint (what gated memory
    files record) is that of the weights as loaded, whichever comes first."""
    from meminject.loading import load_model

    loaded = load_model(model_dirs[arch], bridge=True)
    untouched = (loaded.fingerprint(), loaded.legacy_fingerprint())
    first = load_model(model_dirs[arch], bridge=True)
    get_backend(first, "hf")
    assert (first.fingerprint(), first.legacy_fingerprint()) == untouched
