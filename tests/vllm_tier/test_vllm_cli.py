"""``meminject generate --backend vllm`` as a user runs it (a subprocess): refusals, and
the same tokens as ``--backend hf``. One vLLM engine in this module (the compare run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vllm_tier.conftest import generate_on_both, require_vllm_and_smollm2
from tests.vllm_tier.conftest import run_generate as _run

pytestmark = pytest.mark.vllm

PROMPT = "The capital city of Nepal is located in"


@pytest.fixture(autouse=True)
def _needs() -> None:
    require_vllm_and_smollm2()


def test_refuses_each_memory_it_cannot_run_before_vllm_starts(tmp_path: Path) -> None:
    (tmp_path / "set.toml").write_text(
        "version = 1\n\n"
        '[[memory]]\nname = "fine"\ntext = " Paris"\nlayer = 3\ntau = 2.0\nsite = "attn_out"\n\n'
        '[[memory]]\nname = "hidden"\nstrategy = "gated"\nsite = "attn_z"\nlayer = 3\n'
        'tensors = "never-read.safetensors"\nboundary = 0.3\n\n'
        '[[memory]]\nname = "gate-z"\nstrategy = "gated"\nsite = "attn_z"\nlayer = 2\n'
        'tensors = "never-read.safetensors"\nboundary = 0.3\n'
    )
    done = _run(PROMPT, "--model", "smollm2-135m", "-m", str(tmp_path), "--backend", "vllm")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2, done.stderr[-2000:]
    assert "'hidden'" in errors[0] and "attn_z" in errors[0]
    assert "'gate-z'" in errors[1] and "attn_z" in errors[1]
    assert "fine" not in done.stderr
    assert "EngineCore" not in done.stderr  # refused before vLLM started


def test_refuses_a_plugins_strategy(tmp_path: Path) -> None:
    """A plugin's strategy compiles to Python code, which vLLM's workers never receive."""
    import importlib.util

    if importlib.util.find_spec("meminject_relative") is None:
        pytest.skip("the example plugin meminject-relative is not installed")
    (tmp_path / "set.toml").write_text(
        "version = 1\n\n"
        '[[memory]]\nname = "grow"\nstrategy = "relative"\ntext = " Paris"\nlayer = 3\n'
        "tau = 2.0\n"
    )
    done = _run(
        PROMPT,
        "--model",
        "smollm2-135m",
        "-m",
        str(tmp_path),
        "--backend",
        "vllm",
        plugins="relative",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "'grow'" in errors[0] and "'relative'" in errors[0], errors


def test_refuses_no_kv_cache() -> None:
    done = _run(PROMPT, "--model", "smollm2-135m", "--backend", "vllm", "--no-kv-cache")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("Error: --no-kv-cache")


def test_compare_json_equals_hf(tmp_path: Path) -> None:
    (tmp_path / "set.toml").write_text(
        "version = 1\n\n"
        '[[memory]]\nname = "ocean"\ntext = " ocean"\nlayer = 6\ntau = 4.0\n'
        'site = "resid_post"\npositions = "prompt"\n'
    )
    common = [PROMPT, "--model", "smollm2-135m", "-m", str(tmp_path), "--compare", "--json"]
    common += ["--max-new-tokens", "8", "--show-top", "3"]
    # The baseline's record, then the injected one's.
    got, want = generate_on_both(*common)
    assert [g["memories"] for g in got] == [[], ["ocean"]]
    for g, w in zip(got, want, strict=True):
        assert g["new_tokens"] == w["new_tokens"]
        assert g["prompt_tokens"] == w["prompt_tokens"]
        assert g["backend"] == "vllm"
        assert [t["token_id"] for t in g["top_next"]] == [t["token_id"] for t in w["top_next"]]
        for a, b in zip(g["top_next"], w["top_next"], strict=True):
            assert abs(a["prob"] - b["prob"]) < 1e-3
    assert got[1]["new_tokens"] != got[0]["new_tokens"]
