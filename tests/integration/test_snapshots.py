"""Served snapshots (meminject.snapshots): a model loaded from one must generate what the
bridge-loaded model generates, with no TransformerLens import and no bridge, and a
snapshot that is stale, tampered with or half-written must never be read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from meminject import snapshots
from meminject.engine import compile_memories
from meminject.generation import decode_options, generate, generate_batch
from meminject.loading import load_model
from tests.conftest import write
from tests.integration.test_gated import gated_file

pytestmark = pytest.mark.integration

PROMPT = "The first president of the United States fought in the"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def snapshot_root(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("snapshots")
    monkeypatch_module.setenv(snapshots.SNAPSHOTS_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def pairs(model_dirs, snapshot_root):
    """(bridge-loaded, snapshot-loaded) for each tiny architecture and coordinates."""
    out = {}
    for arch in ("gpt2", "neox", "llama"):
        for coords in ("processed", "raw"):
            full = load_model(model_dirs[arch], coordinates=coords, bridge=True)
            written = snapshots.write(full)
            assert written is not None and (written / snapshots.MARKER).is_file()
            light = load_model(model_dirs[arch], coordinates=coords)
            out[(arch, coords)] = (full, light)
    return out


def memory_set(tmp_path: Path, full) -> Path:
    """Add memories of all three encoders at several sites, and a gated memory whose key
    is the prompt's own resid_post activation (so it fires)."""
    text = "version = 1\n"
    for i, (encoding, site, layer) in enumerate(
        [
            ("unembed", "attn_out", 1),
            ("embed", "resid_pre", 0),
            ("layer", "mlp_out", 1),
            ("unembed", "resid_post", 0),
        ]
    ):
        text += (
            f'[[memory]]\nname = "m{i}"\ntext = "Paris Rome"\nencoding = "{encoding}"\n'
            f'layer = {layer}\nsite = "{site}"\ntau = 3.0\n'
        )
    write(tmp_path / "add.toml", text)
    _, cache = full.bridge.run_with_cache(full.to_tokens(PROMPT))
    key = cache["blocks.0.hook_resid_post"][0, -1].detach().float()
    delta = torch.linspace(-2, 2, key.shape[0])
    gated_file(tmp_path / "gated", [("g", key, delta, 0.5, 20.0)], site="resid_post", layer=0)
    return tmp_path


@pytest.mark.parametrize("coords", ["processed", "raw"])
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_a_snapshot_generates_what_the_bridge_loaded_model_generates(pairs, arch, coords, tmp_path):
    full, light = pairs[(arch, coords)]
    assert not light.has_bridge and light.served is not None
    assert light.fingerprint() == full.fingerprint()
    assert light.dims == full.dims and light.facts == full.facts
    assert torch.equal(light.W_U, full.W_U) and torch.equal(light.W_E, full.W_E)
    assert light.tokenize(PROMPT) == full.tokenize(PROMPT)
    files = memory_set(tmp_path, full)
    for cache in (True, False):
        ours = generate(light, PROMPT, files, max_new_tokens=6, use_kv_cache=cache)
        theirs = generate(full, PROMPT, files, max_new_tokens=6, use_kv_cache=cache)
        assert ours.backend == "hf" == theirs.backend
        assert ours.new_tokens == theirs.new_tokens
    # The memories change the completion, so the comparison above is not of baselines.
    plain = generate(full, PROMPT, None, max_new_tokens=6)
    assert plain.new_tokens != theirs.new_tokens
    assert not light.has_bridge  # nothing above needed TransformerLens


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_encodings_from_a_snapshot_match_the_bridges(pairs, arch, tmp_path):
    full, light = pairs[(arch, "processed")]
    files = memory_set(tmp_path, full)
    light.encodings.clear()
    full.encodings.clear()
    compile_memories(light, files)
    compile_memories(full, files)
    assert light.encodings.keys() == full.encodings.keys() and len(light.encodings) == 4
    for key, ours in light.encodings.items():
        theirs = full.encodings[key]
        if key[0] in ("unembed", "embed"):
            assert torch.equal(ours, theirs)  # the same tensors, summed alike
        else:  # run through the plain model's sdpa attention, not the bridge's eager one
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_batch_with_mixed_memory_sets_matches_the_bridge(pairs, tmp_path):
    full, light = pairs[("llama", "processed")]
    files = memory_set(tmp_path, full)
    prompts = [PROMPT, "Paris is the capital of", "One two three"]
    options = decode_options(max_new_tokens=5)
    results = {}
    for which, model in (("light", light), ("full", full)):
        compiled = compile_memories(model, files)
        per = [compiled, None, compiled[:2]]
        results[which] = [
            r.new_tokens
            for r in generate_batch(model, prompts, memories_per_prompt=per, options=options)
        ]
    assert results["light"] == results["full"]


def test_a_hook_only_the_bridge_has_boots_it_and_matches(pairs, tmp_path):
    from meminject.engine import CompiledHook
    from meminject.extension import SiteHook

    full, _ = pairs[("gpt2", "processed")]
    light = load_model(full.source)  # a fresh one, still without a bridge
    # A per-head add memory is lowered onto the heads' sum, which the plain model has.
    path = write(
        tmp_path / "head.toml",
        'version = 1\n[[memory]]\nname = "h"\ntext = "Paris"\nlayer = 1\n'
        'site = "attn_result"\nhead = 2\ntau = 8.0\n',
    )
    ours = generate(light, PROMPT, path, max_new_tokens=5)
    assert ours.backend == "hf" and not light.has_bridge
    assert ours.new_tokens == generate(full, PROMPT, path, max_new_tokens=5).new_tokens

    # A plugin's hook on one head's result exists only inside the bridge.
    def push(activation, ctx):
        out = activation.clone()
        out[..., 2, :] += 3.0
        return out

    per_head = [
        CompiledHook(SiteHook("blocks.1.attn.hook_result", push, needs_attn_result=True), "t", "t")
    ]
    ours = generate(light, PROMPT, per_head, max_new_tokens=5)
    assert ours.backend == "bridge" and light.has_bridge
    assert "blocks.1.attn.hook_result" in (ours.backend_note or "")
    assert ours.new_tokens == generate(full, PROMPT, per_head, max_new_tokens=5).new_tokens


def test_sites_the_bridge_refused_stay_refused(pairs):
    _, light = pairs[("neox", "processed")]  # parallel attention: no resid_mid
    hf_light = light.backends["hf"]
    reason = hf_light.unsupported("blocks.1.hook_resid_mid")
    assert reason is not None and "parallel" in reason
    assert hf_light.unsupported("blocks.1.hook_mlp_out") is None
    assert "no plain-model equivalent" in hf_light.unsupported("blocks.1.attn.hook_pattern")
    assert not light.has_bridge


def test_generation_from_a_snapshot_imports_no_transformer_lens(pairs, model_dirs, tmp_path):
    full, _ = pairs[("llama", "processed")]
    files = memory_set(tmp_path, full)
    script = (
        "import sys\n"
        "from meminject.loading import load_model\n"
        "from meminject.generation import generate\n"
        f"m = load_model({str(model_dirs['llama'])!r})\n"
        f"r = generate(m, {PROMPT!r}, {str(files)!r}, max_new_tokens=4)\n"
        "print(r.new_tokens, r.backend, m.has_bridge,"
        " any(k.startswith('transformer_lens') for k in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    expected = generate(full, PROMPT, files, max_new_tokens=4).new_tokens
    assert done.stdout.strip() == f"{expected} hf False False"


def test_a_tampered_snapshot_is_passed_over(model_dirs, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(snapshots.SNAPSHOTS_ENV, str(tmp_path / "snaps"))
    full = load_model(model_dirs["gpt2"], bridge=True)
    directory = snapshots.write(full)
    assert directory is not None
    weights = directory / snapshots.WEIGHTS
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("mlp.c_fc.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(weights))
    with caplog.at_level("WARNING", logger="meminject"):
        model = load_model(model_dirs["gpt2"])
    # Loaded from the checkpoint instead (meminject.plain_loading), not the snapshot.
    assert model.served is not None and model.served.directory == model_dirs["gpt2"]
    assert "probe" in caplog.text and str(directory) in caplog.text


def test_a_changed_source_gets_a_new_snapshot(model_dirs, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv(snapshots.SNAPSHOTS_ENV, str(tmp_path / "snaps"))
    source = tmp_path / "model"
    shutil.copytree(model_dirs["gpt2"], source)
    first = snapshots.write(load_model(source, bridge=True))
    assert load_model(source).served is not None
    config = json.loads((source / "config.json").read_text())
    config["layer_norm_epsilon"] = 1e-3
    (source / "config.json").write_text(json.dumps(config))
    model = load_model(source)
    assert model.served is not None and model.served.directory == source  # not the old one
    second = snapshots.write(load_model(source, bridge=True))
    assert second is not None and second != first


def test_snapshots_can_be_turned_off(model_dirs, monkeypatch):
    monkeypatch.setenv(snapshots.SNAPSHOTS_ENV, "off")
    assert snapshots.write(load_model(model_dirs["gpt2"], bridge=True)) is None
    light = load_model(model_dirs["gpt2"])
    assert light.served is not None and light.served.directory == model_dirs["gpt2"]


def test_a_failed_write_leaves_nothing(model_dirs, tmp_path, monkeypatch):
    root = tmp_path / "snaps"
    monkeypatch.setenv(snapshots.SNAPSHOTS_ENV, str(root))
    model = load_model(model_dirs["gpt2"], bridge=True)

    def full_disk(work, *args):
        (work / snapshots.WEIGHTS).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshots, "_write_into", full_disk)
    assert snapshots.write(model) is None
    assert list(root.iterdir()) == []
    light = load_model(model_dirs["gpt2"])
    assert light.served is not None and light.served.directory == model_dirs["gpt2"]


def test_the_cli_loads_a_supported_family_without_transformer_lens(tmp_path, monkeypatch):
    """toyworld is a GPT-2: its first `meminject generate` already loads without
    TransformerLens (meminject.plain_loading), writes no snapshot, and generates what the
    bridge-loaded model generates."""
    root = tmp_path / "snaps"
    monkeypatch.setenv(snapshots.SNAPSHOTS_ENV, str(root))
    memory = REPO / "memories" / "toyworld" / "two-hop" / "rechelur.toml"
    prompt = "The country that uses the greilek is in"
    env = {**os.environ, snapshots.SNAPSHOTS_ENV: str(root)}
    command = ["generate", "--json", "-m", str(memory), prompt]
    first = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "meminject.cli", *command],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert first.returncode == 0, first.stderr
    assert "transformer_lens" not in first.stderr  # -X importtime lists every import
    assert not root.exists() or not any(root.iterdir())
    bridge = load_model("toyworld", bridge=True)
    assert bridge.has_bridge
    expected = generate(bridge, prompt, memory, max_new_tokens=20)
    assert json.loads(first.stdout)["new_tokens"] == expected.new_tokens
