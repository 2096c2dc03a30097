"""The gated strategy (docs/architecture.md#strategies): gate, batching, files, model identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from meminject.engine import inject
from meminject.errors import MemoryFileError
from meminject.generation import generate
from tests.conftest import write

pytestmark = pytest.mark.integration

PROMPT = "The capital of Japan is the city of"


def activations(model, prompt: str, hook: str, memories=None) -> torch.Tensor:
    store = {}

    def grab(a, hook):
        store["a"] = a.detach().clone()

    with torch.no_grad():
        if memories is None:
            model.bridge.run_with_hooks(model.to_tokens(prompt), fwd_hooks=[(hook, grab)])
        else:
            with inject(model, memories):
                model.bridge.run_with_hooks(model.to_tokens(prompt), fwd_hooks=[(hook, grab)])
    return store["a"][0]


def gated_file(
    tmp_path: Path,
    memories: list[tuple[str, torch.Tensor, torch.Tensor, float, float]],
    site: str = "resid_post",
    layer: int = 0,
    model_table: str = "",
    enabled: bool = True,
) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    lines = ["version = 1", model_table]
    for name, key, delta, boundary, hardness in memories:
        save_file(
            {"key": key.contiguous(), "delta": delta.contiguous()},
            str(tmp_path / f"{name}.safetensors"),
        )
        lines += [
            "[[memory]]",
            f'name = "{name}"',
            'strategy = "gated"',
            f'site = "{site}"',
            f"layer = {layer}",
            f'tensors = "{name}.safetensors"',
            f"boundary = {boundary}",
            f"hardness = {hardness}",
            f"enabled = {str(enabled).lower()}",
        ]
    return write(tmp_path / "gated.toml", "\n".join(lines) + "\n")


def tensors_line(path: Path) -> int:
    lines = path.read_text().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if line.startswith("tensors ="))


def reference_gate(a: torch.Tensor, key, delta, b, h) -> torch.Tensor:
    """The formula written out once more, per position, in float64."""
    a64, k, d = a.double(), key.double().flatten(), delta.double().flatten()
    out = []
    for row in a64.reshape(a64.shape[0], -1):
        x = 1 - (row @ k) / (k @ k)
        s = torch.exp(-((x**2 / b**2) ** h))
        out.append(s * d)
    return torch.stack(out).reshape(a.shape)


def test_gate_matches_the_formula(gpt2, tmp_path):
    a = activations(gpt2, PROMPT, "blocks.1.hook_resid_pre")  # = resid_post of layer 0
    key = a[-1].clone()  # the last position is the key: gate 1 there
    delta = torch.randn(64, generator=torch.Generator().manual_seed(0))
    path = gated_file(tmp_path, [("m", key, delta, 0.3, 2.0)])
    after = activations(gpt2, PROMPT, "blocks.1.hook_resid_pre", path)
    expected = a.double() + reference_gate(a, key, delta, 0.3, 2.0)
    torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-5)
    gates = reference_gate(a, key, torch.ones(64), 0.3, 2.0)[:, 0]
    assert gates[-1] == pytest.approx(1.0)
    assert ((gates > 1e-3) & (gates < 0.999)).any() or (gates < 1e-3).any()


@pytest.mark.parametrize("site", ["attn_z", "mlp_post", "attn_out"])
def test_gate_at_other_sites(gpt2, tmp_path, site):
    hook = {
        "attn_z": "blocks.1.attn.hook_z",
        "mlp_post": "blocks.1.mlp.hook_post",
        "attn_out": "blocks.1.hook_attn_out",
    }[site]
    a = activations(gpt2, PROMPT, hook)
    key = a[-2].clone()
    delta = torch.randn(a.shape[1:], generator=torch.Generator().manual_seed(1))
    path = gated_file(tmp_path, [("m", key, delta, 0.5, 3.0)], site=site, layer=1)
    # Read the site's value as the next hook in the chain sees it: add our capture after.
    store = {}
    with torch.no_grad(), inject(gpt2, path):
        gpt2.bridge.run_with_hooks(
            gpt2.to_tokens(PROMPT),
            fwd_hooks=[(hook, lambda x, hook: store.setdefault("a", x.detach().clone()))],
        )
    expected = a.double() + reference_gate(a, key, delta, 0.5, 3.0)
    torch.testing.assert_close(store["a"][0].double(), expected, rtol=1e-5, atol=1e-5)


def test_bank_is_one_batched_computation_equal_to_separate_memories(gpt2, tmp_path):
    a = activations(gpt2, PROMPT, "blocks.1.hook_resid_pre")
    g = torch.Generator().manual_seed(2)
    bank = [
        (f"m{i}", a[i].clone(), torch.randn(64, generator=g), 0.3 + 0.1 * i, 1.0 + i)
        for i in range(1, 7)
    ]
    path = gated_file(tmp_path, bank)
    from meminject.engine import compile_memories

    hooks = compile_memories(gpt2, path)
    assert len(hooks) == 1  # one hook, one keys matrix, for the whole bank
    after = activations(gpt2, PROMPT, "blocks.1.hook_resid_pre", path)
    one_by_one = torch.zeros_like(a)
    for i, memory in enumerate(bank):
        single = gated_file(tmp_path / f"s{i}", [memory])
        one_by_one += activations(gpt2, PROMPT, "blocks.1.hook_resid_pre", single) - a
    torch.testing.assert_close(after, a + one_by_one, rtol=1e-5, atol=1e-5)
    assert (after - a).abs().max() > 1e-3


def test_disabled_gated_memory_is_bit_identical(gpt2, tmp_path):
    a = activations(gpt2, PROMPT, "blocks.1.hook_resid_pre")
    path = gated_file(tmp_path, [("m", a[-1], torch.ones(64), 0.5, 3.0)], enabled=False)
    tokens = gpt2.to_tokens(PROMPT)
    with torch.no_grad():
        plain = gpt2.bridge(tokens)
        with inject(gpt2, path):
            assert torch.equal(gpt2.bridge(tokens), plain)


def test_gated_generation_is_the_same_with_and_without_kv_cache(gpt2, tmp_path):
    a = activations(gpt2, PROMPT, "blocks.1.hook_resid_pre")
    delta = 20 * torch.randn(64, generator=torch.Generator().manual_seed(3))
    path = gated_file(tmp_path, [("m", a[-1], delta, 0.8, 2.0)])
    cached = generate(gpt2, PROMPT, path, max_new_tokens=10, stop_at_eos=False)
    uncached = generate(
        gpt2, PROMPT, path, max_new_tokens=10, use_kv_cache=False, stop_at_eos=False
    )
    assert cached.new_tokens == uncached.new_tokens
    assert (
        cached.new_tokens != generate(gpt2, PROMPT, max_new_tokens=10, stop_at_eos=False).new_tokens
    )


def test_memory_for_another_model_is_refused(gpt2, tmp_path):
    """Files carry checkpoint fingerprints; those written before carry the bridge's
    (blake2b:), still checked, through the bridge."""
    a = activations(gpt2, PROMPT, "blocks.1.hook_resid_pre")
    table = '[model]\nname = "other"\nfingerprint = "blake2b:0123"\n'
    path = gated_file(tmp_path, [("m", a[-1], torch.ones(64), 0.5, 3.0)], model_table=table)
    with pytest.raises(MemoryFileError) as info:
        generate(gpt2, PROMPT, path, max_new_tokens=1)
    assert str(info.value).startswith(
        f"{path}:{tensors_line(path)}: memory 'm': field 'tensors': made for 'other' "
        f"(fingerprint blake2b:0123), not the loaded model '{gpt2.name}' (blake2b:"
    )
    same = gated_file(
        tmp_path / "same",
        [("m", a[-1], torch.ones(64), 0.5, 3.0)],
        model_table=f'[model]\nfingerprint = "{gpt2.fingerprint()}"\n',
    )
    generate(gpt2, PROMPT, same, max_new_tokens=1)
    assert gpt2.fingerprint().startswith("checkpoint-sha256:")
    legacy = gated_file(
        tmp_path / "legacy",
        [("m", a[-1], torch.ones(64), 0.5, 3.0)],
        model_table=f'[model]\nfingerprint = "{gpt2.legacy_fingerprint()}"\n',
    )
    generate(gpt2, PROMPT, legacy, max_new_tokens=1)
    other = gated_file(
        tmp_path / "other",
        [("m", a[-1], torch.ones(64), 0.5, 3.0)],
        model_table='[model]\nfingerprint = "checkpoint-sha256:0123"\n',
    )
    with pytest.raises(MemoryFileError, match=r"not the loaded model .* \(checkpoint-sha256:"):
        generate(gpt2, PROMPT, other, max_new_tokens=1)


def test_memory_made_in_other_coordinates_is_refused(gpt2, tmp_path, monkeypatch):
    a = activations(gpt2, PROMPT, "blocks.1.hook_resid_pre")
    path = gated_file(
        tmp_path,
        [("m", a[-1], torch.ones(64), 0.5, 3.0)],
        model_table='[model]\ncoordinates = "raw"\n',
    )
    # Loaded with the default coordinates: the set's [model] table would have chosen raw
    # on the command line, so Python refuses the set as a whole and says how to load.
    with pytest.raises(
        MemoryFileError,
        match=r"field 'model.coordinates': \[model\] coordinates = 'raw', but model .* is "
        r"loaded in 'processed' coordinates; load it with load_model\(\.\.\., memories=…\)",
    ):
        generate(gpt2, PROMPT, path, max_new_tokens=1)
    # Processed coordinates asked for (as --coordinates processed does): a text memory
    # would run, but a gated memory's tensors are in raw coordinates, so it is refused.
    monkeypatch.setattr(gpt2, "coordinates_asked", True)
    with pytest.raises(
        MemoryFileError, match="made in 'raw' coordinates, but the model is loaded in 'processed'"
    ):
        generate(gpt2, PROMPT, path, max_new_tokens=1)


def test_fingerprint_identifies_weights(gpt2, gpt2_raw, model_dirs):
    from meminject.loading import load_model

    assert gpt2.fingerprint() == load_model(model_dirs["gpt2"]).fingerprint()
    assert gpt2.fingerprint() != gpt2_raw.fingerprint()
    assert gpt2.fingerprint() != load_model(model_dirs["llama"]).fingerprint()


def test_symlink_out_of_the_directory_is_refused_unless_allowed(gpt2, tmp_path):
    from meminject.engine import compile_memories

    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"key": torch.ones(64), "delta": torch.ones(64)}, str(outside / "t.safetensors"))
    inner = tmp_path / "inner"
    inner.mkdir()
    path = gated_file(inner, [("m", torch.ones(64), torch.ones(64), 0.5, 3.0)])
    (inner / "m.safetensors").unlink()
    (inner / "m.safetensors").symlink_to(outside / "t.safetensors")
    with pytest.raises(MemoryFileError, match="resolves outside the memory file's directory"):
        compile_memories(gpt2, path)
    assert len(compile_memories(gpt2, path, allow_outside_paths=True)) == 1
