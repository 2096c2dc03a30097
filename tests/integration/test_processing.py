"""Processed coordinates without TransformerLens (meminject.processing) against the
reference, TransformerBridge's compatibility mode: every processed tensor, the logits,
and every site's activation, on a tiny random model of each supported family with its
norms and biases moved away from their initial values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meminject.backends.hf import BlockPaths, HFBackend, shared_hf_model
from meminject.loading import load_model
from meminject.processing import FAMILIES, family_of, process_in_place
from meminject.sites import PLAIN_SITES, hook_name
from meminject.testing import build_tiny_model
from tests.processed_state import processed_state

pytestmark = pytest.mark.integration

ARCHES = ("gpt2", "neox", "llama", "qwen2", "gemma3", "gemma2", "mistral")


def _perturbed(path: Path, arch: str) -> Path:
    """A tiny model whose every bias and norm differs from its initial value, so that
    folding and centring them is exercised (fresh models start with zero biases)."""
    from safetensors.torch import load_file, save_file

    build_tiny_model(path, arch)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    generator = torch.Generator().manual_seed(7)
    for name, tensor in state.items():
        if name.endswith("bias") or "norm" in name or ".ln_" in name:
            state[name] = tensor + torch.randn(tensor.shape, generator=generator) * 0.2
    save_file(state, str(weights), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=ARCHES)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(the bridge-loaded model, its plain model over the bridge's processed tensors, a
    plain model processed here without TransformerLens)."""
    from transformers import AutoModelForCausalLM

    path = _perturbed(tmp_path_factory.mktemp(request.param), request.param)
    reference = load_model(path, bridge=True)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    family = family_of(plain.config)
    assert family is not None
    unembedding = process_in_place(plain, family)
    return reference, shared_hf_model(reference), plain, unembedding


def test_the_families_cover_the_supported_architectures() -> None:
    assert {"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma2", "gemma3_text"} <= set(
        FAMILIES
    )


def test_every_processed_tensor_equals_the_bridges(pair) -> None:
    """Every tensor, with the folds an RMSNorm model defers applied to a copy
    (fold_deferred); the RMSNorm model itself keeps its gains and its raw (tied or
    untied) lm_head, and its lazy unembedding's columns are the bridge's."""
    _, reference, plain, unembedding = pair
    family = family_of(plain.config)
    assert family is not None
    assert (unembedding is not None) == (family.norm != "layer")
    ours, theirs = processed_state(plain, family, unembedding), reference.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    if unembedding is not None:
        embedding, lm_head = plain.get_input_embeddings(), plain.get_output_embeddings()
        tied = bool(plain.config.tie_word_embeddings)
        assert (lm_head.weight.data_ptr() == embedding.weight.data_ptr()) == tied
        some = [0, 5, plain.config.vocab_size - 1]
        w_u = theirs["lm_head.weight"].T
        torch.testing.assert_close(
            unembedding.columns(lm_head.weight, some), w_u[:, some], rtol=1e-5, atol=1e-6
        )
        # Deferred means untouched: the readers and the norms are the checkpoint's.
        raw = type(plain).from_pretrained(plain.name_or_path, dtype=torch.float32).state_dict()
        for name, tensor in plain.state_dict().items():
            if "v_proj.bias" not in name and "o_proj.bias" not in name:
                assert torch.equal(tensor, raw[name]), name


def test_logits_and_every_site_equal_the_bridges(pair) -> None:
    loaded, _, plain, _ = pair
    backend = HFBackend(loaded, plain, BlockPaths.of_bridge(loaded.bridge))
    names = [hook_name(site, layer) for site in PLAIN_SITES for layer in range(2)]
    maps = backend.measure(names)
    for name in names:
        site_map = maps[name]
        if isinstance(site_map, str):  # only a parallel block's resid_mid has no plain twin
            assert loaded.facts.parallel_attn_mlp and name.endswith("hook_resid_mid"), site_map
            continue
        # The bridge's activation is the plain one (an offset kind only where noise won).
        assert site_map.error <= 1e-4, (name, site_map)
        assert site_map.offset is None or float(site_map.offset.abs().max()) < 1e-5
    ids = backend.probe()
    with torch.no_grad():
        ours = plain(ids, use_cache=False).logits.float().log_softmax(-1)
        theirs = loaded.bridge(ids).float().log_softmax(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ("gpt2", "llama"))
@pytest.mark.parametrize("coordinates", ("processed", "raw"))
def test_loading_without_the_bridge_generates_what_the_bridge_does(
    model_dirs, arch: str, coordinates: str
) -> None:
    """load_model on a supported family loads the plain model itself
    (no snapshot, no TransformerLens): the same greedy tokens with and without a memory,
    the same fingerprint, and the bridge only on demand."""
    from meminject.generation import generate

    bridge = load_model(model_dirs[arch], coordinates=coordinates, bridge=True)
    plain = load_model(model_dirs[arch], coordinates=coordinates)
    assert not plain.has_bridge and plain.served is not None
    assert plain.served.directory == model_dirs[arch]
    assert plain.facts == bridge.facts
    assert plain.fingerprint() == bridge.fingerprint() and not plain.has_bridge
    memory = {"name": "m", "text": "George Washington", "layer": 1, "tau": 6.0}
    prompt = "The first president of the United States fought in the"
    for memories in (None, memory):
        ours = generate(plain, prompt, memories, max_new_tokens=6, stop_at_eos=False)
        theirs = generate(bridge, prompt, memories, max_new_tokens=6, stop_at_eos=False)
        assert ours.backend == "hf" and ours.new_tokens == theirs.new_tokens
    assert not plain.has_bridge


def test_block_paths_and_facts_are_the_bridges(pair) -> None:
    from meminject.plain_loading import block_paths, facts_of

    loaded, _, plain, _ = pair
    family = family_of(plain.config)
    assert family is not None
    assert block_paths(family) == BlockPaths.of_bridge(loaded.bridge)
    assert facts_of(plain.config, family) == loaded.facts


@pytest.mark.parametrize("arch", ("gpt2", "llama"))
def test_bfloat16_loads_without_the_bridge_as_with_it(model_dirs, arch: str) -> None:
    """bfloat16 on the CPU: processed in float32 and cast once, the plain model's
    tensors are the bridge's to bfloat16's precision, and so are the logits and a
    memory's vector (computed in float32, cast once)."""
    from meminject.backends import Step, get_backend
    from meminject.engine import compile_memories
    from meminject.generation import generate

    bridge = load_model(model_dirs[arch], dtype="bfloat16", bridge=True)
    plain = load_model(model_dirs[arch], dtype="bfloat16")
    assert plain.dtype == torch.bfloat16 and not plain.has_bridge
    reference = shared_hf_model(bridge).state_dict()
    family = family_of(plain.served.hf.config)
    assert family is not None
    ours = processed_state(plain.served.hf, family, plain.served.unembedding)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor.float(), reference[name].float(), rtol=2e-2, atol=2e-3)
    memory = {"name": "m", "text": "George Washington", "layer": 1, "tau": 6.0}
    (ours_hook,) = compile_memories(plain, [memory])
    (their_hook,) = compile_memories(bridge, [memory])
    ours_v, their_v = ours_hook.hook.additions[0].vector, their_hook.hook.additions[0].vector
    assert ours_v.dtype == their_v.dtype == torch.bfloat16
    torch.testing.assert_close(ours_v.float(), their_v.float(), rtol=2e-2, atol=2e-2)
    ids = plain.to_tokens("The first president of the United States fought in the")
    with torch.no_grad():
        ours = get_backend(plain, "hf").forward(Step(ids, use_cache=False))[0]
        theirs = get_backend(bridge, "hf").forward(Step(ids, use_cache=False))[0]
    assert float((ours.float() - theirs.float()).abs().max()) < 0.05
    result = generate(plain, "The first president", [memory], max_new_tokens=3)
    assert result.backend == "hf" and len(result.new_tokens) == 3
    assert not plain.has_bridge


@pytest.mark.parametrize("arch", ("qwen2", "gemma3", "gemma2"))
def test_a_tied_model_keeps_one_copy_and_encodes_as_the_bridge(tmp_path: Path, arch: str) -> None:
    """A tied RMSNorm model loads without untying (the embedding is the unembedding, one
    tensor), and what reads the processed unembedding still gets the bridge's: the
    ``unembed`` encoding, ``W_U`` itself, and greedy generation with a memory."""
    from meminject.engine import compile_memories
    from meminject.generation import generate

    path = _perturbed(tmp_path / arch, arch)
    bridge = load_model(path, bridge=True)
    plain = load_model(path)
    assert not plain.has_bridge and plain.served is not None
    hf = plain.served.hf
    shared = hf.get_input_embeddings().weight.data_ptr()
    assert hf.get_output_embeddings().weight.data_ptr() == shared
    assert plain.served.unembedding is not None
    torch.testing.assert_close(plain.W_U, bridge.W_U, rtol=1e-5, atol=1e-6)
    some = [1, 2, 3]
    torch.testing.assert_close(plain.unembed_columns(some), bridge.W_U[:, some].float())
    memory = {"name": "m", "text": "George Washington", "layer": 1, "tau": 6.0}
    (ours,) = compile_memories(plain, [memory])
    (theirs,) = compile_memories(bridge, [memory])
    torch.testing.assert_close(
        ours.hook.additions[0].vector, theirs.hook.additions[0].vector, rtol=1e-5, atol=1e-5
    )
    prompt = "The first president of the United States fought in the"
    for memories in (None, memory):
        a = generate(plain, prompt, memories, max_new_tokens=6, stop_at_eos=False)
        b = generate(bridge, prompt, memories, max_new_tokens=6, stop_at_eos=False)
        assert a.backend == "hf" and a.new_tokens == b.new_tokens
    assert not plain.has_bridge
