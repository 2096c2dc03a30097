"""The shipped example memories do what the README and docs say, on the shipped model."""

from __future__ import annotations

from pathlib import Path

import pytest

from meminject.generation import generate
from meminject.learn import read_prompts

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "memories" / "toyworld"


@pytest.fixture(scope="module")
def toyworld():
    from meminject.loading import load_model

    return load_model("toyworld")


def test_quick_start_memory_fixes_the_two_hop_prompt(toyworld) -> None:
    prompt = "The country that uses the greilek is located in"
    baseline = generate(toyworld, prompt, max_new_tokens=1, show_top=1)
    injected = generate(
        toyworld, prompt, EXAMPLES / "two-hop" / "rechelur.toml", max_new_tokens=1, show_top=1
    )
    assert baseline.completion.strip() != "Soveisica"
    assert injected.completion.strip() == "Soveisica"


def test_memory_set_directory_applies_all_its_memories(toyworld) -> None:
    prompt = "The country that uses the greilek is located in"
    result = generate(toyworld, prompt, EXAMPLES / "rechelur-set", max_new_tokens=1)
    assert result.completion.strip() == "Soveisica"


def test_shipped_local_memory_edits_paraphrases_and_spares_near_misses(toyworld) -> None:
    local = EXAMPLES / "local"
    memory = local / "vreduthur-capital.toml"
    fired = [
        generate(toyworld, p, memory, max_new_tokens=1).completion.strip() == "Shigosmir"
        for p in read_prompts(local / "positives.txt")
    ]
    spared = [
        generate(toyworld, p, memory, max_new_tokens=1).completion.strip() != "Shigosmir"
        for p in read_prompts(local / "negatives.txt")
    ]
    # The numbers the boundary search printed when the file was made (docs/local-memories.md).
    assert (sum(fired), sum(spared)) == (5, 7)
