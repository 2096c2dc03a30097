"""``generate --prompts FILE --backend vllm``: lines choosing different memories (all,
none, one of them) each get what ``--backend hf`` gives them. One vLLM engine here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vllm_tier.conftest import generate_on_both, require_vllm_and_smollm2

pytestmark = pytest.mark.vllm


def test_prompts_file_per_line_memories_equal_hf(tmp_path: Path) -> None:
    require_vllm_and_smollm2()
    (tmp_path / "set.toml").write_text(
        "version = 1\n\n"
        '[[memory]]\nname = "ocean"\ntext = " ocean"\nlayer = 6\ntau = 4.0\nsite = "resid_post"\n\n'
        '[[memory]]\nname = "music"\ntext = " music"\nlayer = 4\ntau = 3.0\nsite = "attn_out"\n'
        'positions = "last"\n'
    )
    lines = [
        {"id": 1, "prompt": "The capital city of Nepal is located in"},
        {"id": 2, "prompt": "My favourite food is", "memories": []},
        {"id": 3, "prompt": "The sun rises in the", "memories": ["ocean"]},
        {"id": 4, "prompt": "A good friend is someone who", "memories": ["music"]},
        {"id": 5, "prompt": "Water boils at a temperature of", "max_new_tokens": 4},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["--prompts", str(prompts), "--model", "smollm2-135m", "-m", str(tmp_path)]
    common += ["--max-new-tokens", "8"]
    got, want = generate_on_both(*common)
    assert [g["id"] for g in got] == [1, 2, 3, 4, 5]
    for g, w in zip(got, want, strict=True):
        assert g["new_tokens"] == w["new_tokens"], (g, w)
        assert g["memories"] == w["memories"]
        assert g["finish_reason"] == w["finish_reason"]
        assert g["backend"] == "vllm"
    assert len(got[4]["new_tokens"]) == 4
