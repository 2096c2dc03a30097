"""``meminject export --format llama-cpp``: the control-vector GGUF read back with the
``gguf`` package, and its directions added to the *raw* Hugging Face model with plain
PyTorch hooks reproduce meminject's next-token distribution with the memories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from meminject.cli import cli
from meminject.engine import compile_memories, inject
from meminject.export_llama_cpp import read_control_vector
from meminject.extension import InjectionContext
from meminject.loading import load_model
from tests.conftest import write
from tests.integration.test_gated import gated_file

pytestmark = pytest.mark.integration

PROMPT = "The first president of the United States fought in the"


@pytest.fixture(scope="module")
def deep_dirs(tmp_path_factory):
    """Three-block tiny models: block 0 cannot be a direction, so two blocks are 1 and 2."""
    from meminject.testing import build_tiny_model

    root = tmp_path_factory.mktemp("deep")
    return {arch: build_tiny_model(root / arch, arch, n_layers=3) for arch in ("gpt2", "llama")}


def memories(tmp_path: Path, coordinates: str = "processed") -> Path:
    """Two memories on block 1 (they add up) and one on block 2, all resid_post/all."""
    body = f'version = 1\n[model]\ncoordinates = "{coordinates}"\n'
    for name, text, layer, tau in (
        ("a", "Paris Rome", 1, 3.0),
        ("b", "war", 1, 2.0),
        ("c", "George", 2, 4.0),
    ):
        body += (
            f'[[memory]]\nname = "{name}"\ntext = "{text}"\nlayer = {layer}\n'
            f'site = "resid_post"\ntau = {tau}\n'
        )
    return write(tmp_path / "cv.toml", body)


def export(*args: str) -> object:
    return CliRunner().invoke(cli, ["export", *args], catch_exceptions=False)


def blocks_of(hf: torch.nn.Module) -> torch.nn.ModuleList:
    base = hf.base_model
    return base.layers if hasattr(base, "layers") else base.h


def raw_log_probs(directory: Path, ids: list[int], vectors: dict) -> torch.Tensor:
    """Next-token log-probabilities of the checkpoint as llama.cpp would run it: raw
    weights, each direction added to its block's output."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    handles = []
    for block, direction in vectors.items():
        vector = torch.as_tensor(direction)

        def add(module, args, output, vector=vector):
            if isinstance(output, tuple):
                return (output[0] + vector, *output[1:])
            return output + vector

        handles.append(blocks_of(hf)[block].register_forward_hook(add))
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return torch.log_softmax(logits.double(), -1)


def meminject_log_probs(model, path: Path | None, prompt: str = PROMPT) -> torch.Tensor:
    tokens = model.to_tokens(prompt)
    compiled = compile_memories(model, path) if path is not None else []
    with torch.no_grad(), inject(model, compiled, context=InjectionContext(tokens.shape[1])):
        logits = model.bridge(tokens)[0, -1]
    return torch.log_softmax(logits.double(), -1)


@pytest.mark.parametrize("coords", ["processed", "raw"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_file_read_back_reproduces_meminjects_logits_on_the_raw_model(
    deep_dirs, tmp_path, arch, coords
):
    directory = deep_dirs[arch]
    path = memories(tmp_path, coords)
    out = tmp_path / "cv.gguf"
    result = export(str(path), "--model", str(directory), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "2 directions (blocks 1, 2)" in result.output and "τ is baked in" in result.output

    meta, vectors = read_control_vector(out)
    model = load_model(directory, coordinates=coords)
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == model.bridge.original_model.config.model_type
    assert meta["controlvector.layer_count"] == 2
    assert sorted(vectors) == [1, 2]
    for vector in vectors.values():
        assert vector.dtype.name == "float32" and vector.shape == (model.dims.d_model,)

    # direction.1 is τ_a·v_a + τ_b·v_b: the sum of the compiled additions at block 1.
    compiled = compile_memories(model, path)
    expected = {a.layer: a.vector for c in compiled for a in c.hook.additions}
    torch.testing.assert_close(torch.as_tensor(vectors[2]), expected[2].float())
    assert float(torch.as_tensor(vectors[1]).norm()) > 0

    ids = model.to_tokens(PROMPT)[0].tolist()
    ours = meminject_log_probs(model, path)
    theirs = raw_log_probs(directory, ids, vectors)
    baseline = meminject_log_probs(model, None)
    assert float((ours - baseline).abs().max()) > 0.05  # the memories move the answer
    error = float((ours - theirs).abs().max())
    assert error < 1e-4, error
    assert int(ours.argmax()) == int(theirs.argmax())


def test_memories_it_cannot_express_are_refused_one_line_each(model_dirs, tmp_path):
    path = write(
        tmp_path / "mixed.toml",
        'version = 1\n[[memory]]\nname = "ok"\ntext = "x"\nlayer = 1\nsite = "resid_post"\n'
        'tau = 1.0\n[[memory]]\nname = "attn"\ntext = "x"\nlayer = 1\ntau = 1.0\n'
        '[[memory]]\nname = "last"\ntext = "x"\nlayer = 1\nsite = "resid_post"\ntau = 1.0\n'
        'positions = "last"\n[[memory]]\nname = "zero"\ntext = "x"\nlayer = 0\n'
        'site = "resid_post"\ntau = 1.0\n',
    )
    key, delta = torch.zeros(64), torch.ones(64)
    gated = gated_file(tmp_path / "g", [("gate", key + 1, delta, 0.5, 3.0)], layer=1)
    out = tmp_path / "cv.gguf"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["export", str(path), str(gated), "--model", str(model_dirs["gpt2"]), "-o", str(out)]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 4, result.output
    assert "memory 'attn'" in lines[0] and "site 'attn_out'" in lines[0]
    assert "memory 'last'" in lines[1] and "'last'" in lines[1]
    assert "memory 'zero'" in lines[2] and "block 0" in lines[2]
    assert "memory 'gate'" in lines[3] and "'gated' memory" in lines[3]
    assert not out.exists() and list(tmp_path.glob(".cv.gguf.*")) == []


def test_an_existing_file_needs_force(deep_dirs, tmp_path):
    path = memories(tmp_path)
    out = write(tmp_path / "cv.gguf", "keep me")
    args = [str(path), "--model", str(deep_dirs["llama"]), "-o", str(out)]
    result = CliRunner().invoke(cli, ["export", *args])
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_text() == "keep me"
    assert export(*args, "--force").exit_code == 0
    assert read_control_vector(out)[0]["controlvector.layer_count"] == 2
