"""Memories under tensor parallelism: ``tensor_parallel_size=2`` on vLLM's CPU build
(one core per rank, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``) over a small random-weight
Llama in float32 (head size 64, which vLLM's CPU attention needs) whose 4 heads, 4 KV
heads and MLP split across the two ranks. With memories at every site the workers hook,
alone and all together, greedy tokens and every token's log-probability equal the
``hf`` backend's: each memory is added once to the whole residual stream, not once per
rank (nor to one rank's slice only). One engine for the module."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vllm_tier.conftest import require_vllm

pytestmark = pytest.mark.vllm

PROMPTS = [
    "The capital city of Nepal is located in",
    "My favourite food is",
    "Once upon a time, in a small village,",
    "Water boils at a temperature of",
]
NEW = 8
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_vllm()
    from meminject.loading import load_model
    from meminject.testing import build_tiny_model

    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor_parallel_size=2 needs two CPU cores (one per rank)")
    path = build_tiny_model(
        tmp_path_factory.mktemp("tp") / "llama", "llama", d_model=256, n_layers=4, n_heads=4
    )
    model = load_model(path, dtype="float32")
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def engine(tiny: Any) -> Iterator[Any]:
    from meminject.vllm_backend import prepare, start_engine

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    tokens, source, dtype = prepare(tiny)
    vm = start_engine(tokens, source, dtype, max_model_len=128, tensor_parallel_size=2)
    yield vm
    vm.close()


def _memories(path: Path) -> dict[str, Any]:
    """One memory per site (an add with positions, and a gated one at resid_post whose key
    is the stream at the first prompt's last token)."""
    sets: dict[str, Any] = {
        site: [
            {
                "name": f"m-{site}",
                "text": " ocean",
                "layer": 1 + i % 3,
                "tau": 6.0,
                "site": site,
                "positions": ("all", "prompt", "last", "generated", "all")[i],
            }
        ]
        for i, site in enumerate(SITES)
    }
    sets["gated"] = path
    return sets


@pytest.fixture(scope="module")
def gated(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from safetensors.torch import save_file

    ids = tiny.tokenize(PROMPTS[0])
    with torch.no_grad():
        out = tiny.served.hf(torch.tensor([ids]), output_hidden_states=True)
    key = out.hidden_states[3][0, -1].float()
    word = tiny.tokenize(" village", prepend_bos=False)[0]
    direction = tiny.W_U[:, word].float()
    delta = direction / direction.norm() * key.norm() * 2.0
    root = tmp_path_factory.mktemp("tp-gated")
    save_file({"key": key.contiguous(), "delta": delta.contiguous()}, root / "g.safetensors")
    (root / "gated.toml").write_text(
        'version = 1\n\n[[memory]]\nname = "g"\nstrategy = "gated"\nsite = "resid_post"\n'
        'layer = 2\ntensors = "g.safetensors"\nboundary = 0.3\nhardness = 2.0\n'
    )
    return root / "gated.toml"


def _hf(model: Any, memories: Any) -> list[Any]:
    from meminject.engine import compile_memories
    from meminject.generation import DecodeOptions, generate_batch

    compiled = compile_memories(model, memories) if memories is not None else None
    options = DecodeOptions(max_new_tokens=NEW, logprobs=0)
    return generate_batch(model, PROMPTS, compiled, options=options, backend="hf")


def _same(vllm_runs: list[Any], hf_runs: list[Any]) -> None:
    for v, h in zip(vllm_runs, hf_runs, strict=True):
        assert v.new_tokens == h.new_tokens, (v.prompt, v.completion, h.completion)
        for a, b in zip(v.token_logprobs, h.token_logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-3, (v.prompt, a, b)


def test_every_site_under_tensor_parallelism_equals_hf(engine: Any, tiny: Any, gated: Path) -> None:
    from meminject.engine import as_memory_set
    from meminject.generation import DecodeOptions
    from meminject.memfile import MemorySet
    from meminject.vllm_backend.plan import compile_plan

    assert engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    sets = _memories(gated)
    every = MemorySet(tuple(f for s in sets.values() for f in as_memory_set(s).files))
    choices: list[Any] = [None, *sets.values(), every]
    plans = [compile_plan(tiny, c) if c is not None else None for c in choices]
    engine.install(None)
    options = DecodeOptions(max_new_tokens=NEW, logprobs=0)
    # Every choice's prompts in one batch: each request runs its own set on both ranks.
    prompts = PROMPTS * len(choices)
    runs = engine.generate(prompts, options, memories=[p for p in plans for _ in PROMPTS])
    baseline = _hf(tiny, None)
    changed = 0
    for i, memories in enumerate(choices):
        want = _hf(tiny, memories)
        _same(runs[i * len(PROMPTS) : (i + 1) * len(PROMPTS)], want)
        changed += any(a.new_tokens != b.new_tokens for a, b in zip(want, baseline, strict=True))
    assert changed >= len(choices) - 2  # the memories move the tokens (so twice would show)


def test_mlp_post_is_refused_under_tensor_parallelism(engine: Any, tiny: Any, gated: Path) -> None:
    from meminject.errors import BadInputError
    from meminject.vllm_backend.plan import compile_plan

    text = gated.read_text().replace('site = "resid_post"', 'site = "mlp_post"')
    text = text.replace("g.safetensors", "h.safetensors")
    import torch
    from safetensors.torch import save_file

    width = tiny.served.hf.config.intermediate_size
    save_file(
        {"key": torch.ones(width), "delta": torch.ones(width)}, gated.parent / "h.safetensors"
    )
    (gated.parent / "post.toml").write_text(text)
    plan = compile_plan(tiny, gated.parent / "post.toml")
    with pytest.raises(BadInputError, match="mlp_post"):
        engine.install(plan)
