"""The shipped toyworld model and its training script, end to end.

Why: toyworld is the default model of every offline command and of the paper's
experiment on this project. It must (1) know its single-hop facts, (2) fail on the held-out
two-hop prompts (the phenomenon memory injection repairs), (3) load through both plain
transformers and TransformerLens 4 with the same predictions, and (4) be reproducible
from the shipped training script.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meminject.toyworld import WEIGHTS_DIR, dataset_path, load_world
from meminject.toyworld.metrics import evaluate

pytestmark = pytest.mark.integration

PROMPTS = (
    "The capital of {c} is",
    "The leader of {c} is",
    "The currency of {c} is the",
    "{c} is located in",
)


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    return evaluate()


def _bridge(model_dir: Path) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(model_dir), device="cpu")
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def _hf(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    return model, tok


def _check_bridge_matches_hf(model_dir: Path, countries: list[str]) -> None:
    """TransformerLens prepends BOS and predicts the same top-1 token as transformers."""
    import torch

    model, tok = _hf(model_dir)
    bridge = _bridge(model_dir)
    for c in countries:
        for tpl in PROMPTS:
            prompt = tpl.replace("{c}", c)
            toks = bridge.to_tokens(prompt)
            ids = [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]
            assert toks[0].tolist() == ids
            with torch.no_grad():
                tl_logits = bridge(toks)[0, -1]
                hf_logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert int(tl_logits.argmax()) == int(hf_logits.argmax()), prompt
            # Compatibility mode centres the logits; compare log-probabilities.
            torch.testing.assert_close(
                torch.log_softmax(tl_logits, -1),
                torch.log_softmax(hf_logits, -1),
                atol=1e-3,
                rtol=1e-3,
            )


def test_shipped_files_present() -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "world.json",
        "dataset.csv",
    ):
        assert (WEIGHTS_DIR / name).is_file(), name
    assert not list(WEIGHTS_DIR.glob("*.bin")) and not list(WEIGHTS_DIR.glob("*.pt"))
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir() if p.is_file())
    assert size <= 10 * 2**20


def test_single_hop_accuracy(metrics: dict[str, Any]) -> None:
    assert metrics["single_hop"]["n"] >= 1000
    assert metrics["single_hop"]["top1"] >= 0.95


def test_heldout_two_hop_fails(metrics: dict[str, Any]) -> None:
    single, held = metrics["single_hop"], metrics["heldout_two_hop"]
    assert held["n"] == sum(1 for _ in dataset_path().open(encoding="utf-8")) - 1
    assert held["top1"] < single["top1"]
    assert held["mean_prob"] < single["mean_prob"]
    # The explicit counterparts of the same rows are known.
    assert metrics["heldout_explicit"]["top1"] >= 0.95
    assert held["mean_prob"] < metrics["heldout_explicit"]["mean_prob"] / 2


def test_answer_first_tokens_unambiguous() -> None:
    """Within a relation, answers start with different tokens (first-token metrics are fair)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(WEIGHTS_DIR))
    assert tok.bos_token_id is not None and tok.bos_token == "<|endoftext|>"
    world = load_world()
    for rel, facts in world.facts.items():
        answers = sorted(set(facts.values()))
        firsts = {tok.encode(" " + a, add_special_tokens=False)[0] for a in answers}
        assert len(firsts) == len(answers), rel


def test_shipped_loads_in_transformer_lens() -> None:
    world = load_world()
    _check_bridge_matches_hf(WEIGHTS_DIR, world.countries[:3])


def test_train_script_small(tmp_path: Path) -> None:
    out = tmp_path / "tw"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "meminject.toyworld.train"),
            *("--small", "--steps", "30", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "single_hop" in proc.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "world.json"):
        assert (out / name).is_file(), name
    log = json.loads((out / "train_log.json").read_text())
    assert log["recipe"]["steps"] == 30
    model, tok = _hf(out)
    assert tok.bos_token_id is not None
    assert model.config.n_layer == log["recipe"]["n_layer"]
    _check_bridge_matches_hf(out, load_world(out).countries[:1])
