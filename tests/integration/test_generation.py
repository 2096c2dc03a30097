"""Batched generation: every row of a left-padded batch, with its own memory set,
generates what its prompt generates alone; and the decoding options mean what they mean
in ``transformers``."""

from __future__ import annotations

import pytest
import torch

from meminject.errors import BadInputError
from meminject.generation import (
    DecodeOptions,
    generate,
    generate_batch,
    penalised,
    sampling_scores,
)

pytestmark = pytest.mark.integration

# Different lengths, so every batch pads; the first and last are the same prompt with
# different memory sets, so the sets are seen to act.
PROMPTS = [
    "The first president of the United States fought in the",
    "Hello",
    "A cat sat on the",
    "The first president of the United States fought in the",
    "Rome is",
]
POSITION_SETS = ['"all"', '"prompt"', '"generated"', '"last"', "[1, -1]"]


def memory_sets(arch: str, positions: str) -> list:
    """Three sets over four sites (resid_mid only where the block is sequential)."""
    pos = positions.strip('"') if positions.startswith('"') else [1, -1]
    a = [
        {"name": "a1", "text": "Paris Rome", "layer": 1, "site": "resid_pre", "tau": 5.0},
        {"name": "a2", "text": "Berlin", "layer": 0, "head": 1, "tau": 4.0},
    ]
    b = [{"name": "b1", "text": "London", "layer": 0, "site": "mlp_out", "tau": 6.0}]
    if arch != "neox":
        b.append({"name": "b2", "text": "Tokyo", "layer": 1, "site": "resid_mid", "tau": 5.0})
    for memory in (*a, *b):
        memory["positions"] = pos
    return [None, a, b, a, b]


@pytest.fixture(scope="module")
def tiny(model_dirs):
    from meminject.loading import load_model

    return {arch: load_model(model_dirs[arch]) for arch in ("gpt2", "neox", "llama")}


@pytest.mark.parametrize("cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("positions", POSITION_SETS)
@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
@pytest.mark.parametrize("backend", ["hf", "bridge"])
def test_a_batch_generates_what_each_prompt_generates_alone(tiny, arch, positions, cache, backend):
    model = tiny[arch]
    sets = memory_sets(arch, positions)
    options = DecodeOptions(max_new_tokens=8, stop_at_eos=False)
    batch = generate_batch(
        model,
        PROMPTS,
        memories_per_prompt=sets,
        options=options,
        batch_size=len(PROMPTS),
        use_kv_cache=cache,
        backend=backend,
    )
    alone = [
        generate(
            model, p, s, max_new_tokens=8, stop_at_eos=False, use_kv_cache=cache, backend=backend
        )
        for p, s in zip(PROMPTS, sets, strict=True)
    ]
    assert [g.backend for g in batch] == [backend] * len(PROMPTS)
    assert [g.new_tokens for g in batch] == [g.new_tokens for g in alone]
    assert [g.prompt for g in batch] == PROMPTS  # results come back in the prompts' order
    assert batch[0].new_tokens != batch[3].new_tokens  # the memory set changed the output


def test_batch_size_splits_without_changing_tokens(tiny):
    model = tiny["llama"]
    sets = memory_sets("llama", '"all"')
    runs = [
        generate_batch(model, PROMPTS, memories_per_prompt=sets, batch_size=n, options=None)
        for n in (1, 2, 5)
    ]
    assert runs[0] == runs[1] == runs[2]


def test_rows_stop_on_their_own(tiny):
    """Rows with different max_new_tokens, and a row stopped by a stop string, finish
    when they would alone while the others go on."""
    model = tiny["gpt2"]
    free = generate(model, PROMPTS[0], max_new_tokens=10, stop_at_eos=False)
    stop = model.decode(free.new_tokens[3:5])
    options = [
        DecodeOptions(max_new_tokens=10, stop_at_eos=False, stop=(stop,)),
        DecodeOptions(max_new_tokens=2, stop_at_eos=False),
        DecodeOptions(max_new_tokens=10, stop_at_eos=False),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    batch = generate_batch(model, prompts, options=options, batch_size=3)
    assert batch[0].finish_reason == "stop"
    assert stop not in batch[0].completion
    assert free.completion.startswith(batch[0].completion)
    assert batch[0].completion == free.completion[: free.completion.find(stop)]
    assert batch[1].finish_reason == "length" and len(batch[1].new_tokens) == 2
    assert len(batch[2].new_tokens) == 10
    for got, prompt, opt in zip(batch, prompts, options, strict=True):
        alone = generate_batch(model, [prompt], options=opt)[0]
        assert got.new_tokens == alone.new_tokens


def test_sampled_rows_match_their_solo_runs_given_a_seed(tiny):
    model = tiny["gpt2"]
    options = DecodeOptions(max_new_tokens=6, temperature=1.5, seed=7, stop_at_eos=False)
    batch = generate_batch(model, PROMPTS, options=options, batch_size=5)
    alone = [generate_batch(model, [p], options=options)[0] for p in PROMPTS]
    assert [g.new_tokens for g in batch] == [g.new_tokens for g in alone]
    other = generate_batch(
        model, PROMPTS[:1], options=DecodeOptions(**{**options.__dict__, "seed": 8})
    )[0]
    assert other.new_tokens != batch[0].new_tokens  # the seed matters (1.5: near-uniform)


def test_top_k_one_and_a_tiny_top_p_sample_the_greedy_token(tiny):
    model = tiny["llama"]
    greedy = generate(model, PROMPTS[2], max_new_tokens=6, stop_at_eos=False)
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = generate(
            model,
            PROMPTS[2],
            max_new_tokens=6,
            stop_at_eos=False,
            temperature=2.0,
            seed=1,
            **kwargs,
        )
        assert sampled.new_tokens == greedy.new_tokens, kwargs


def test_sampling_filters_keep_what_transformers_keeps():
    """The tokens left finite by top-k and top-p are the ones transformers' own
    warpers keep, on random scores."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(500, generator=generator, dtype=torch.float64) * 3
        k, p, t = 5 + trial * 7, 0.3 + 0.03 * trial, 0.7 + 0.1 * trial
        ours = sampling_scores(logits, DecodeOptions(temperature=t, top_k=k, top_p=p))
        theirs = logits.unsqueeze(0)
        for warper in (TemperatureLogitsWarper(t), TopKLogitsWarper(k), TopPLogitsWarper(p)):
            theirs = warper(None, theirs)
        assert torch.equal(ours.isfinite(), theirs[0].isfinite()), trial
        kept = ours.isfinite()
        torch.testing.assert_close(
            torch.softmax(ours[kept], -1), torch.softmax(theirs[0][kept], -1)
        )


def test_repetition_penalty_is_transformers_one():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(300, generator=generator)
    seen = [3, 17, 17, 250, 4, 99]
    for penalty in (0.5, 1.3, 2.0):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.tensor([seen]), logits.unsqueeze(0).clone()
        )[0]
        assert torch.equal(penalised(logits, seen, penalty), theirs)


def test_repetition_penalty_changes_a_repeating_greedy_completion(tiny):
    model = tiny["gpt2"]
    plain = generate(model, "the the the the", max_new_tokens=12, stop_at_eos=False)
    penalised_run = generate(
        model, "the the the the", max_new_tokens=12, stop_at_eos=False, repetition_penalty=5.0
    )
    assert len(set(plain.new_tokens)) < len(set(penalised_run.new_tokens))


def test_ignore_eos_generates_past_the_end_token(tmp_path, model_dirs):
    """With a model whose most likely token is EOS, stop_at_eos ends at once and
    stop_at_eos=False goes on (the EOS token is then part of the completion)."""
    from meminject.loading import load_model

    model = load_model(model_dirs["gpt2"])
    eos = model.tokenizer.eos_token_id
    # A memory pushing the unembedding of EOS makes EOS the greedy token.
    push = [
        {
            "name": "eos",
            "text": model.decode([eos]),
            "layer": 1,
            "site": "resid_post",
            "tau": 200.0,
            "positions": "all",
        }
    ]
    stopped = generate(model, PROMPTS[0], push, max_new_tokens=5)
    assert stopped.new_tokens == [eos] and stopped.finish_reason == "eos"
    assert stopped.completion == ""
    going = generate(model, PROMPTS[0], push, max_new_tokens=5, stop_at_eos=False)
    assert len(going.new_tokens) == 5 and going.finish_reason == "length"


def test_chat_applies_the_tokenizers_template(tiny):
    model = tiny["llama"]
    tokenizer = model.tokenizer
    with pytest.raises(BadInputError, match="no chat template"):
        generate(model, "Hi", max_new_tokens=1, chat=True)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        chat = generate(model, "Hi", max_new_tokens=2, chat=True)
        expected = tokenizer.encode("<|user|>Hi\n<|assistant|>", add_special_tokens=False)
        assert chat.prompt_tokens == expected
        assert chat.prompt == "Hi"
    finally:
        tokenizer.chat_template = None


def test_bad_options_are_refused_with_the_field_named(tiny):
    model = tiny["gpt2"]
    for kwargs, field in (
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"top_k": 10**9}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"show_top": -1}, "show_top"),
    ):
        with pytest.raises(BadInputError, match=field):
            generate(model, "Hi", max_new_tokens=1, **kwargs)
    with pytest.raises(BadInputError, match="2 memory sets were given for 1 prompts"):
        generate_batch(model, ["Hi"], memories_per_prompt=[None, None])
    with pytest.raises(BadInputError, match="batch_size"):
        generate_batch(model, ["Hi"], batch_size=0)


@pytest.mark.parametrize("backend", ["hf", "bridge"])
def test_gated_and_added_memories_at_one_site_batch_like_solo(tiny, tmp_path, backend):
    """A gate reads each row's own activation; with an addition at the same hook point the
    point is not position-free, so rows are sliced by padding. The key is the first
    prompt's own activation at its last token, so the gate fires in that row only."""
    from tests.integration.test_gated import gated_file

    model = tiny["gpt2"]
    store = {}
    with torch.no_grad():
        model.bridge.run_with_hooks(
            model.to_tokens(PROMPTS[0]),
            fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: store.setdefault("a", a))],
        )
    key = store["a"][0, -1].clone()
    delta = torch.randn(key.shape, generator=torch.Generator().manual_seed(3)) * 6.0
    gated = gated_file(tmp_path, [("g", key, delta, 0.05, 3.0)], site="resid_pre", layer=1)
    from meminject.loading import load_memories

    add_file = tmp_path / "add.toml"
    add_file.write_text(
        'version = 1\n[[memory]]\nname = "a"\ntext = "Rome"\nlayer = 1\n'
        'site = "resid_pre"\ntau = 2.0\n',
        encoding="utf-8",
    )
    both = load_memories([gated, add_file])
    assert {e.memory.strategy for e in both.entries} == {"gated", "add"}
    added = load_memories([add_file])
    sets = [both, added, both, None, both]
    options = DecodeOptions(max_new_tokens=6, stop_at_eos=False)
    batch = generate_batch(
        model, PROMPTS, memories_per_prompt=sets, options=options, batch_size=5, backend=backend
    )
    alone = [
        generate(model, p, s, max_new_tokens=6, stop_at_eos=False, backend=backend)
        for p, s in zip(PROMPTS, sets, strict=True)
    ]
    assert [g.new_tokens for g in batch] == [g.new_tokens for g in alone]
    plain = generate(model, PROMPTS[0], None, max_new_tokens=6, stop_at_eos=False)
    assert batch[0].new_tokens != plain.new_tokens  # the gate fired for the keyed prompt


def test_on_token_streams_each_rows_tokens_and_can_end_one_row(tiny):
    """The callback sees every row's tokens in order as they are picked (what a server
    streams); returning False ends that row there ("cancelled", a client gone) while
    the rows beside it generate exactly what they generate alone."""
    model = tiny["llama"]
    sets = memory_sets("llama", '"all"')[:3]
    prompts = PROMPTS[:3]
    options = DecodeOptions(max_new_tokens=8, stop_at_eos=False)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def stream(index: int, token: int) -> bool:
        seen[index].append(token)
        return not (index == 1 and len(seen[1]) == 3)

    batch = generate_batch(
        model, prompts, memories_per_prompt=sets, options=options, batch_size=3, on_token=stream
    )
    alone = [
        generate_batch(model, [p], memories_per_prompt=[s], options=options)[0]
        for p, s in zip(prompts, sets, strict=True)
    ]
    assert [seen[i] for i in range(3)] == [g.new_tokens for g in batch]
    assert batch[1].finish_reason == "cancelled" and len(batch[1].new_tokens) == 3
    assert batch[1].new_tokens == alone[1].new_tokens[:3]
    for i in (0, 2):
        assert batch[i].new_tokens == alone[i].new_tokens and batch[i].finish_reason == "length"


def test_token_logprobs_are_the_models_log_softmax(tiny):
    model = tiny["gpt2"]
    result = generate(model, PROMPTS[0], max_new_tokens=4, stop_at_eos=False, logprobs=3)
    assert [t.token_id for t in result.token_logprobs] == result.new_tokens
    # Recompute each step's distribution with a plain forward over prompt + tokens so far.
    ids = list(result.prompt_tokens)
    for step in result.token_logprobs:
        with torch.no_grad():
            logits = model.bridge(torch.tensor([ids]))[0, -1]
        expected = torch.log_softmax(logits.float(), -1)
        assert abs(step.logprob - float(expected[step.token_id])) < 1e-4
        assert [t[1] for t in step.top] == expected.topk(3).indices.tolist()
        assert step.top[0][1] == step.token_id  # greedy: the chosen token is the top one
        ids.append(step.token_id)
    assert "token_logprobs" in result.to_dict()
    assert "token_logprobs" not in generate(model, PROMPTS[0], max_new_tokens=2).to_dict()
    with pytest.raises(BadInputError, match="logprobs must be between 0 and 20"):
        generate(model, PROMPTS[0], max_new_tokens=2, logprobs=21)


def test_a_row_whose_scores_turn_non_finite_ends_alone(model_dirs, tmp_path):
    """With on_finish, an overflowing row is reported with its error and the other rows
    of its batch give their solo results; each row is reported once. Without it, the
    error is raised as before."""
    from meminject.engine import added_scales
    from meminject.errors import NonFiniteScoresError
    from meminject.generation import DecodeOptions, generate_batch
    from meminject.loading import load_memories, load_model
    from meminject.memfile import MemoryChoice
    from tests.conftest import write

    model = load_model(model_dirs["llama"])
    path = write(
        tmp_path / "m.toml",
        'version = 1\n[[memory]]\nname = "paris"\ntext = "Paris Rome"\nlayer = 1\n'
        'site = "resid_pre"\ntau = 5.0\n[[memory]]\nname = "far"\ntext = "Paris Rome"\n'
        'layer = 1\nsite = "resid_pre"\ntau = 1.0\ntau_units = "resid_norm"\n'
        "resid_norm = 10.0\n",
    )
    memory_set = load_memories([path])
    big = torch.finfo(torch.float32).max
    scale = added_scales(model, memory_set)["far"]
    hostile = memory_set.choose(
        [MemoryChoice("far", 0.999 * big / scale), MemoryChoice("paris", 0.99 * big)]
    )
    normal = memory_set.choose([MemoryChoice("paris")])
    prompts = ["The first president", "Hello there", "The first president"]
    sets = [None, hostile, normal]
    options = DecodeOptions(max_new_tokens=4)
    reported: dict[int, object] = {}

    def on_finish(index: int, result: object) -> None:
        assert index not in reported
        reported[index] = result

    results = generate_batch(
        model, prompts, memories_per_prompt=sets, options=options, on_finish=on_finish
    )
    assert isinstance(reported[1], NonFiniteScoresError)
    assert results[1].finish_reason == "error"
    for index in (0, 2):
        alone = generate_batch(
            model, [prompts[index]], memories_per_prompt=[sets[index]], options=options
        )[0]
        assert reported[index] == results[index]
        assert results[index].new_tokens == alone.new_tokens
    with pytest.raises(NonFiniteScoresError):
        generate_batch(model, prompts, memories_per_prompt=sets, options=options)
