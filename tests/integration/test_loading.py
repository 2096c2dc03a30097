"""Model loading by local path, and its failure messages (docs/architecture.md#models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meminject.errors import ModelLoadError
from meminject.generation import generate
from meminject.loading import load_model

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_tiny_models_load_by_path_and_generate(model_dirs: dict[str, Path], arch: str) -> None:
    model = load_model(model_dirs[arch])
    assert model.dims.d_model == 64 and model.dims.n_layers == 2 and model.dims.n_heads == 4
    assert model.dims.d_vocab == 50257
    # GPT-2's real BPE: " Washington" is one token, as in GPT-2.
    assert model.tokenize(" Washington", prepend_bos=False) == [2669]
    result = generate(model, "The capital of France is", max_new_tokens=5, stop_at_eos=False)
    assert len(result.new_tokens) == 5


def test_dtype_option_is_applied(gpt2_dir: Path) -> None:
    import torch

    model = load_model(gpt2_dir, dtype="bfloat16", coordinates="raw")
    assert model.dtype == torch.bfloat16


def test_missing_local_path_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^no model directory at .*nothing-here$"):
        load_model(str(tmp_path / "nothing-here"))


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is not a Hugging Face model directory"):
        load_model(tmp_path)


def test_unreachable_hub_gives_one_clear_message() -> None:
    # HF_HUB_OFFLINE=1 (conftest) makes the failure immediate; without a network the
    # same message comes after the hub client's retries.
    with pytest.raises(ModelLoadError) as info:
        load_model("gpt2-small")
    assert str(info.value) == "could not download 'gpt2'; pass a local path or use toyworld"


def test_unknown_coordinates_and_dtype_are_rejected(gpt2_dir: Path) -> None:
    from meminject.errors import BadInputError

    with pytest.raises(BadInputError, match="unknown coordinates 'folded'"):
        load_model(gpt2_dir, coordinates="folded")
    with pytest.raises(BadInputError, match="unknown dtype 'float8'"):
        load_model(gpt2_dir, dtype="float8")
