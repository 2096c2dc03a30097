"""``meminject export --format vllm``: a memory plan file that vLLM's workers load as
data (``vllm serve``; docs/vllm.md). Needs no vLLM: the file is read back here, and the
vllm tier serves it (tests/vllm_tier/test_vllm_own_server.py)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from meminject.cli import cli
from meminject.errors import BadInputError
from meminject.loading import load_model
from meminject.vllm_backend.plan import compile_plan, plan_files, read_plan_file
from tests.conftest import write

pytestmark = pytest.mark.integration

MEMORIES = (
    'version = 1\n[[memory]]\nname = "a"\ntext = "x"\nlayer = 1\nsite = "resid_post"\n'
    'tau = 2.0\n[[memory]]\nname = "b"\ntext = "y"\nlayer = 0\nsite = "attn_out"\ntau = 1.0\n'
    'positions = "last"\n'
)


def export(*args: str) -> object:
    return CliRunner().invoke(cli, ["export", "--format", "vllm", *args])


def test_the_plan_file_holds_the_compiled_set(model_dirs, tmp_path):
    path = write(tmp_path / "set.toml", MEMORIES)
    out = tmp_path / "plans" / "both.safetensors"
    out.parent.mkdir()
    result = export(str(path), "--model", str(model_dirs["llama"]), "-o", str(out))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("wrote plan 'both' (2 changes)")
    fields = json.loads(lines[1].split("with: ", 1)[1])
    plan, meta = read_plan_file(out)
    want = compile_plan(load_model(model_dirs["llama"]), path)
    assert plan.hooks == want.hooks
    for name, tensor in want.tensors.items():
        assert torch.equal(plan.tensors[name], tensor)
    assert fields == {"vllm_xargs": {"meminject": "both"}, "cache_salt": want.digest()}
    assert meta["digest"] == want.digest() and meta["n_layers"] == "2"
    assert "--worker-cls meminject.vllm_backend.vllm_serve.MemoryWorker" in lines[2]
    assert f"MEMINJECT_VLLM_PLANS={out.parent}" in lines[2]
    assert plan_files(out.parent) == {"both": out}


def test_bad_names_models_and_memories_are_refused_and_nothing_is_written(model_dirs, tmp_path):
    path = write(tmp_path / "set.toml", MEMORIES)
    llama = str(model_dirs["llama"])
    for name in ("bad name.safetensors", "plan.gguf", ".hidden.safetensors"):
        result = export(str(path), "--model", llama, "-o", str(tmp_path / name))
        assert result.exit_code == 2 and "NAME.safetensors" in result.output, result.output
    gpt2 = export(
        str(path), "--model", str(model_dirs["gpt2"]), "-o", str(tmp_path / "g.safetensors")
    )
    assert gpt2.exit_code == 2 and "Llama family" in gpt2.output
    gated = write(
        tmp_path / "z.toml",
        'version = 1\n[[memory]]\nname = "z1"\nstrategy = "gated"\nsite = "attn_z"\nlayer = 1\n'
        'tensors = "never.safetensors"\nboundary = 0.3\n'
        '[[memory]]\nname = "z2"\nstrategy = "gated"\nsite = "attn_z"\nlayer = 0\n'
        'tensors = "never.safetensors"\nboundary = 0.3\n',
    )
    refused = export(str(gated), "--model", llama, "-o", str(tmp_path / "z.safetensors"))
    assert refused.exit_code == 2
    errors = [line for line in refused.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2 and "'z1'" in errors[0] and "'z2'" in errors[1]
    assert list(tmp_path.glob("*.safetensors")) == []


def test_a_damaged_or_foreign_file_is_refused_naming_it(model_dirs, tmp_path):
    path = write(tmp_path / "set.toml", MEMORIES)
    out = tmp_path / "p.safetensors"
    assert export(str(path), "--model", str(model_dirs["llama"]), "-o", str(out)).exit_code == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(out)
    changed = {k: v * 2 for k, v in tensors.items()}
    save_file(changed, tmp_path / "changed.safetensors", metadata=meta)
    with pytest.raises(BadInputError, match=r"changed\.safetensors: its digest"):
        read_plan_file(tmp_path / "changed.safetensors")
    save_file(tensors, tmp_path / "foreign.safetensors", metadata={"format": "other"})
    with pytest.raises(BadInputError, match=r"foreign\.safetensors: not a meminject vLLM plan"):
        read_plan_file(tmp_path / "foreign.safetensors")
    again = export(str(path), "--model", str(model_dirs["llama"]), "-o", str(out))
    assert again.exit_code == 2 and "--force" in again.output
