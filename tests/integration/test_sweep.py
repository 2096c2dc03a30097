"""Sweeps on tiny real models: the fast path against the plain reference loop, the
paper's statistics recomputed by hand, shards, controls, the command line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from meminject.cli import _Group
from meminject.cli.sweep import sweep as sweep_command
from meminject.datasets import PromptRow
from meminject.default_plugins.datasets import load_csv
from meminject.errors import BadInputError
from meminject.hookspecs import hookimpl
from meminject.plugins import build_registry
from meminject.sweep import (
    SweepConfig,
    answer_tokens,
    control_texts,
    read_records,
    reference_cell,
    run_sweep,
    summarize,
    tokenize_row,
)
from meminject.sweep.rows import in_context_prompt
from meminject.sweep.stats import paired
from tests.conftest import SHARED_DATA, write

pytestmark = pytest.mark.integration

# Our own multi-hop prompts (different lengths, so batches are padded).
ROWS = [
    PromptRow("The first emperor of Rome was born in the", "Augustus", "city of Rome", None, 0),
    PromptRow("The capital of the country north of Spain is", "France", "Paris", None, 1),
    PromptRow("The author of Hamlet was born in", "William Shakespeare", "Stratford", None, 2),
    PromptRow("Water boils at", "one hundred degrees", "100 degrees", None, 3),
    PromptRow(
        "The inventor of the telephone, who also taught the deaf, was born in the city of",
        "Alexander Graham Bell",
        "Edinburgh",
        None,
        4,
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CI box has 2 cores shared with other jobs; two busy-waiting torch threads on a
    loaded machine are ~100x slower than one for the tiny matrices here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _head(value) -> int | None:
    return None if pd.isna(value) else int(value)


def _matched_to(row, rec) -> str | None:
    """The text a record's vector was rescaled to: a control's row memory, when the sweep
    matched controls to their memory's length."""
    matched = rec.kind == "control" and getattr(rec, "control_norm", "own") == "memory"
    return row.memory if matched else None


def assert_matches_reference(model, rows, records, metric, registry=None):
    """Every record equals the reference loop's two plain forward passes: 1e-5 in
    probability, and 1e-4 relative (the tiny random models give p ~ 1e-5, where an
    absolute tolerance alone would prove nothing)."""
    by_id = {r.row_id: r for r in rows}
    worst_abs = worst_rel = 0.0
    for rec in records.itertuples(index=False):
        before, after = reference_cell(
            model,
            by_id[rec.row_id],
            layer=int(rec.layer),
            tau=float(rec.tau),
            encoding=str(rec.encoding),
            head=_head(rec.head),
            metric=metric,
            memory_text=rec.memory,
            registry=registry,
            positions=getattr(rec, "positions", "all"),
            length_of=_matched_to(by_id[rec.row_id], rec),
        )
        for ours, theirs in ((rec.p_before, before), (rec.p_after, after)):
            worst_abs = max(worst_abs, abs(ours - theirs))
            worst_rel = max(worst_rel, abs(math.log(ours) - math.log(theirs)))
    # The in-context baseline is the plain pass on the memory's text before the prompt.
    for row_id, logp in records.groupby("row_id")["logp_in_context"].first().items():
        if math.isnan(logp):  # run with --baselines none
            continue
        row = by_id[row_id]
        prompted = dataclasses.replace(row, prompt=in_context_prompt(row))
        p, _ = reference_cell(model, prompted, layer=0, tau=0.0, encoding="unembed", metric=metric)
        worst_abs = max(worst_abs, abs(math.exp(logp) - p))
        worst_rel = max(worst_rel, abs(logp - math.log(p)))
    assert worst_abs < 1e-5
    assert worst_rel < 1e-4
    # The injections must matter, or the equality proves nothing.
    assert records["pct_change"].abs().max() > 1.0


@pytest.mark.parametrize("metric", ["first-token", "full"])
def test_sweep_equals_reference_loop_on_every_cell(gpt2, metric):
    config = SweepConfig(
        layers=(0, 1),
        taus=(0.0, 5.0),
        encodings=("unembed", "embed", "layer"),
        controls=2,
        batch_size=2,  # three batches, padded
        metric=metric,
    )
    result = run_sweep(gpt2, ROWS, config)
    records = result.records
    # Variants: the memory, the shuffled baseline's memory, 2 controls.
    assert len(records) == len(ROWS) * 2 * 2 * 3 * 4
    assert result.stats["replays"] > 0 and result.stats["full_passes"] == 0
    assert result.stats["fallback_batches"] == 0
    zero = records["tau"] == 0.0
    assert (records[zero]["p_after"] == records[zero]["p_before"]).all()  # τ = 0: no hook
    assert_matches_reference(gpt2, ROWS, records[~zero], metric)


@pytest.mark.parametrize("metric", ["first-token", "full"])
@pytest.mark.parametrize("positions", ["last", "not-bos"])
def test_position_ablations_equal_the_reference_loop(gpt2, positions, metric):
    """The prompt's last token only, or every position but the first: each record equals
    the reference loop with the same positions written as a memory file's position list,
    and differs from adding at every position."""
    base = dict(layers=(0, 1), taus=(5.0,), encodings=("unembed",), controls=1, metric=metric)
    config = SweepConfig(**base, batch_size=2, positions=positions)
    records = run_sweep(gpt2, ROWS, config).records
    assert set(records["positions"]) == {positions}
    assert_matches_reference(gpt2, ROWS, records, metric)
    everywhere = run_sweep(gpt2, ROWS, SweepConfig(**base, batch_size=2)).records
    assert np.abs(np.log(records["p_after"]) - np.log(everywhere["p_after"])).max() > 1e-3
    with pytest.raises(BadInputError, match="positions: \\['" + positions):
        run_sweep(gpt2, ROWS, SweepConfig(**base), done=records)


def _by_hand_through_head(model, row, layer, head, tau, text):
    """p(whole answer, teacher-forced) with head ``head``'s value mix (``attn.hook_z``)
    moved by τ·v·pinv(W_O[h]) at every position: made without the engine, the sweep or
    the lowering onto the attention output."""
    ids = list(dict.fromkeys(model.tokenize(text, prepend_bos=False)))
    v = model.bridge.W_U.detach()[:, ids].sum(-1)  # the unembed encoding, by hand
    dz = (tau * v) @ torch.linalg.pinv(model.bridge.W_O[layer, head].detach())
    prompt = model.tokenize(row.prompt)
    answer = model.tokenizer.encode(" " + row.answer, add_special_tokens=False)
    tokens = torch.tensor([prompt + answer[:-1]])

    def add(z, hook):
        z = z.clone()
        z[:, :, head] += dz
        return z

    with torch.no_grad():
        logits = model.bridge.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", add)]
        )
    logp = torch.log_softmax(logits[0].double(), -1)
    first = len(prompt) - 1
    return math.exp(sum(logp[first + j, t].item() for j, t in enumerate(answer)))


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_head_cells_route_the_memory_through_the_heads_value_mix(request, model_dirs, arch):
    """A head cell is the memory routed through that head (site attn_z): checked against
    the reference loop (an attn_z AddMemory through the engine) and against a hand-made
    edit of ``attn.hook_z``; heads give different numbers, and each record says how much
    of its memory the head can write."""
    from meminject.loading import load_model

    model = request.getfixturevalue("gpt2") if arch == "gpt2" else load_model(model_dirs[arch])
    config = SweepConfig(
        layers=(0, 1),
        taus=(6.0,),
        encodings=("unembed",),
        heads=(0, 3),
        controls=1,
        metric="full",
    )
    result = run_sweep(model, ROWS[:3], config)
    records = result.records
    assert sorted(records["head"].unique()) == [0, 3]
    assert set(records["site"]) == {"attn_z"}
    assert result.stats["fallback_batches"] == 0
    # One batch: one replay per layer · head · τ · variant (memory, shuffled, control; the
    # check is not counted).
    assert result.stats["replays"] == 2 * 2 * 1 * 3
    assert_matches_reference(model, ROWS[:3], records, "full")
    by_id = {r.row_id: r for r in ROWS}
    for rec in records[records["row_id"] == 2].itertuples(index=False):
        by_hand = _by_hand_through_head(
            model, by_id[rec.row_id], int(rec.layer), int(rec.head), float(rec.tau), rec.memory
        )
        assert rec.p_after == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    shares = records["head_share"]
    assert ((shares > 0) & (shares < 1)).all()  # d_head 16 of d_model 64
    wide = records.pivot_table(
        index=["row_id", "layer", "kind", "control"],
        columns="head",
        values="logp_after",
        dropna=False,
    )
    assert (wide[0] - wide[3]).abs().max() > 1e-4  # heads are not one cell repeated
    assert not getattr(model.bridge.cfg, "use_attn_result", False)


def test_full_forward_fallback_gives_the_same_numbers(gpt2):
    config = SweepConfig(layers=(0, 1), taus=(1.0, 4.0), encodings=("unembed",), controls=1)
    fast = run_sweep(gpt2, ROWS, config)
    slow = run_sweep(gpt2, ROWS, config, force_full=True)
    assert slow.stats["replays"] == 0 and slow.stats["full_passes"] > 0
    np.testing.assert_allclose(fast.records["p_after"], slow.records["p_after"], rtol=1e-5)
    pd.testing.assert_frame_equal(
        fast.records.drop(columns=["p_after", "change", "pct_change"]),
        slow.records.drop(columns=["p_after", "change", "pct_change"]),
    )


def test_layers_before_the_injection_layer_run_once_per_batch(gpt2):
    """The speed claim, by construction: block 0 runs only in the base passes when the
    sweep injects at layer 1, whatever the number of τ values and controls."""
    calls = {0: 0, 1: 0}
    handles = [
        gpt2.bridge.blocks[i].register_forward_hook(
            lambda *args, i=i: calls.__setitem__(i, calls[i] + 1)
        )
        for i in (0, 1)
    ]
    try:
        config = SweepConfig(
            layers=(1,),
            taus=(1.0, 2.0, 3.0, 4.0),
            encodings=("unembed",),
            controls=2,
            batch_size=2,
        )
        result = run_sweep(gpt2, ROWS, config)
    finally:
        for handle in handles:
            handle.remove()
    batches = result.stats["base_passes"]
    assert batches == 3 and result.stats["reference_passes"] == batches
    assert calls[0] == 2 * batches  # base + the in-context baseline (a prompt of its own)
    # base + in-context + check + cells × variants (memory, shuffled, 2 controls)
    assert calls[1] == 3 * batches + 4 * 4 * batches


def test_statistics_recomputed_by_hand(gpt2):
    config = SweepConfig(layers=(1,), taus=(2.0, 5.0), encodings=("embed",), controls=2)
    result = run_sweep(gpt2, ROWS, config)
    summary = result.summary
    # p_before from an independent forward pass with the answer's first token taken as
    # the tokenizer sees " " + answer.
    row = ROWS[1]
    tokens = gpt2.to_tokens(row.prompt)
    target = gpt2.tokenizer.encode(" " + row.answer, add_special_tokens=False)[0]
    with torch.no_grad():
        p = torch.softmax(gpt2.bridge(tokens)[0, -1].double(), -1)[target].item()
    mine = result.records[result.records["row_id"] == 1]
    assert mine["p_before"].to_numpy() == pytest.approx(p, rel=1e-5)

    for tau in (2.0, 5.0):
        cell = result.records[result.records["tau"] == tau]
        memory = cell[cell["kind"] == "memory"].sort_values("row_id")
        before = memory["p_before"].tolist()
        after = memory["p_after"].tolist()
        pct = [100 * (a - b) / b for a, b in zip(after, before, strict=True)]
        control = cell[cell["kind"] == "control"]
        c_pct = [
            100 * (a - b) / b for a, b in zip(control["p_after"], control["p_before"], strict=True)
        ]
        got = summary[summary["tau"] == tau].iloc[0]
        assert got["n"] == len(ROWS) and got["control_n"] == 2 * len(ROWS)
        assert got["p_before"] == pytest.approx(sum(before) / len(before))
        assert got["p_after"] == pytest.approx(sum(after) / len(after))
        assert got["mean_change"] == pytest.approx(
            sum(a - b for a, b in zip(after, before, strict=True)) / len(ROWS)
        )
        assert got["mean_pct"] == pytest.approx(sum(pct) / len(pct))
        assert got["median_pct"] == pytest.approx(sorted(pct)[len(pct) // 2])  # 5 rows: odd
        assert got["share_improved"] == pytest.approx(
            sum(a > b for a, b in zip(after, before, strict=True)) / len(ROWS)
        )
        assert got["control_mean_pct"] == pytest.approx(sum(c_pct) / len(c_pct))
        assert got["control_median_pct"] == pytest.approx(float(np.median(c_pct)))
        # The paired statistics, from the records' own log-probabilities.
        lift = np.log(memory["p_after"].to_numpy()) - np.log(memory["p_before"].to_numpy())
        control_log = (
            control.assign(logp=np.log(control["p_after"])).groupby("row_id")["logp"].mean()
        )
        effect = np.log(memory["p_after"].to_numpy()) - control_log.loc[memory["row_id"]].to_numpy()
        assert got["median_lift"] == pytest.approx(float(np.median(lift)), rel=1e-9)
        assert got["median_effect"] == pytest.approx(float(np.median(effect)), rel=1e-9)
        assert got["median_gain"] == pytest.approx(
            float(np.median(np.minimum(lift, effect))), rel=1e-9
        )
        assert got["share_beats_controls"] == pytest.approx(float((effect > 0).mean()))
        assert got["gain_ci_low"] <= got["median_gain"] <= got["gain_ci_high"]
    best = result.best()
    helps = summary[(summary["median_lift"] > 0) & (summary["median_effect"] > 0)]
    if helps.empty:
        assert best is None
    else:
        assert best is not None and best["median_gain"] == helps["median_gain"].max()


def test_shards_partition_the_rows_and_their_union_is_the_whole_sweep(gpt2):
    config = dict(layers=(0, 1), taus=(1.0, 3.0), encodings=("unembed",), controls=2)
    whole = run_sweep(gpt2, ROWS, SweepConfig(**config)).records
    parts = [run_sweep(gpt2, ROWS, SweepConfig(**config, shard=(i, 3))).records for i in range(3)]
    ids = [set(p["row_id"]) for p in parts]
    assert ids == [{0, 3}, {1, 4}, {2}]
    keys = ["row_id", "layer", "tau", "encoding", "kind", "control"]
    union = pd.concat(parts).sort_values(keys).reset_index(drop=True)
    whole = whole.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        union.drop(columns=["p_before", "p_after", "change", "pct_change"]),
        whole.drop(columns=["p_before", "p_after", "change", "pct_change"]),
        check_categorical=False,
    )
    np.testing.assert_allclose(union["p_after"], whole["p_after"], rtol=1e-5)
    # Each row's shuffled baseline is another row's memory, the same in every shard.
    own = whole[whole["kind"] == "memory"].groupby("row_id")["memory"].first()
    other = whole[whole["kind"] == "shuffled"].groupby("row_id")["memory"].first()
    assert (own != other).all() and set(other) <= {row.memory for row in ROWS}
    # Shards' records summarize to the whole sweep's summary.
    np.testing.assert_allclose(
        summarize(union)["mean_pct"], summarize(whole)["mean_pct"], rtol=1e-4
    )


def test_controls_are_seeded_same_length_and_free_of_the_answer(gpt2):
    row = ROWS[4]
    first = control_texts(gpt2, row, 4, seed=0)
    assert control_texts(gpt2, row, 4, seed=0) == first
    assert control_texts(gpt2, row, 4, seed=1) != first
    assert len(set(first)) == 4
    n_memory = len(gpt2.tokenize(row.memory, prepend_bos=False))
    banned = set(answer_tokens(gpt2, row.prompt, row.answer))
    for text in first:
        ids = gpt2.tokenize(text, prepend_bos=False)
        assert len(ids) == n_memory
        assert not banned & set(ids)
    # A row's controls depend on its id, not on which shard or batch it lands in.
    moved = PromptRow(row.prompt, row.memory, row.answer, None, row.row_id)
    assert control_texts(gpt2, moved, 4, seed=0) == first


def test_answer_is_tokenized_as_the_prompts_continuation(gpt2):
    tok = gpt2.tokenizer
    assert answer_tokens(gpt2, "The capital of France is", "Paris") == tok.encode(
        " Paris", add_special_tokens=False
    )
    # No second space when the prompt already ends with one, or the answer starts with one.
    assert answer_tokens(gpt2, "The capital of France is ", "Paris") == tok.encode(
        "Paris", add_special_tokens=False
    )
    assert answer_tokens(gpt2, "The capital of France is", " Paris") == tok.encode(
        " Paris", add_special_tokens=False
    )
    full = tokenize_row(gpt2, ROWS[0], "full")
    answer = tok.encode(" city of Rome", add_special_tokens=False)
    assert full.targets == answer
    assert full.input_ids[-len(answer) + 1 :] == answer[:-1]
    assert full.read_positions[0] == len(gpt2.tokenize(ROWS[0].prompt)) - 1


class _DoubleEncoder:
    """A plugin encoder (2 × unembed): sweeps must use plugin encoders too."""

    @staticmethod
    @hookimpl
    def register_encoders(register):
        from meminject.default_plugins.encoders import encode_unembed

        def double(request):
            """Twice the unembedding sum."""
            return 2 * encode_unembed(request)

        register("double", double)


def test_plugin_encoders_work_in_sweeps(gpt2):
    registry = build_registry([("double-plugin", _DoubleEncoder())], load_entrypoints=False)
    config = SweepConfig(layers=(1,), taus=(1.5,), encodings=("double",), controls=1)
    doubled = run_sweep(gpt2, ROWS[:3], config, registry=registry).records
    assert_matches_reference(gpt2, ROWS[:3], doubled, "first-token", registry=registry)
    plain = run_sweep(
        gpt2, ROWS[:3], SweepConfig(layers=(1,), taus=(3.0,), controls=1), registry=registry
    ).records
    np.testing.assert_allclose(doubled["p_after"], plain["p_after"], rtol=1e-5)


def test_bad_configurations_are_one_line_errors(gpt2):
    with pytest.raises(BadInputError, match="layer 2 is out of range"):
        run_sweep(gpt2, ROWS, SweepConfig(layers=(2,), taus=(1.0,)))
    with pytest.raises(BadInputError, match="head 4 is out of range"):
        run_sweep(gpt2, ROWS, SweepConfig(layers=(0,), taus=(1.0,), heads=(4,)))
    with pytest.raises(BadInputError, match="unknown encoding 'nope'"):
        run_sweep(gpt2, ROWS, SweepConfig(layers=(0,), taus=(1.0,), encodings=("nope",)))
    with pytest.raises(BadInputError, match="unknown answer metric"):
        SweepConfig(layers=(0,), taus=(1.0,), metric="last")


# --------------------------------------------------------------------------- CLI


def _dataset(tmp_path: Path) -> Path:
    lines = ["obscure_sentence,explicit_entity,answer"]
    lines += [f'"{r.prompt}",{r.memory},{r.answer}' for r in ROWS]
    return write(tmp_path / "data.csv", "\n".join(lines) + "\n")


def _group() -> click.Group:
    group = _Group(name="meminject")
    group.add_command(sweep_command)
    return group


def test_cli_sweep_writes_records_and_heatmap(gpt2, gpt2_dir, tmp_path):
    data = _dataset(tmp_path)
    out = tmp_path / "out" / "records.parquet"
    png = tmp_path / "heat.png"
    args = [
        "sweep", str(data), "--model", str(gpt2_dir), "--layers", "0-1", "--tau", "1,4",
        "--encoding", "unembed,embed", "--controls", "1", "--batch-size", "2",
        "--output", str(out), "--plot", str(png), "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(_group(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "best cell by median_gain: layer" in result.output or "no cell helps" in result.output
    assert "median gain [95% CI]" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_records(out)
    expected = run_sweep(
        gpt2,
        load_csv(data),
        SweepConfig(layers=(0, 1), taus=(1.0, 4.0), encodings=("unembed", "embed"), controls=1),
    ).records
    assert len(records) == len(expected) == 5 * 2 * 2 * 2 * 3
    np.testing.assert_allclose(records["p_after"], expected["p_after"], rtol=1e-5)
    assert list(records["memory"]) == list(expected["memory"])
    assert records["head"].isna().all()

    # CSV output, the same numbers; refusing to overwrite without --force.
    csv_out = tmp_path / "records.csv"
    csv_args = [a if a != str(out) else str(csv_out) for a in args if a not in ("--plot", str(png))]
    assert CliRunner().invoke(_group(), csv_args).exit_code == 0
    again = read_records(csv_out)
    np.testing.assert_allclose(again["p_after"], records["p_after"], rtol=1e-12)
    assert again["head"].isna().all() and list(again["control"].isna()) == list(
        records["control"].isna()
    )
    refused = CliRunner().invoke(_group(), csv_args)
    assert refused.exit_code == 2
    assert "exists; pass --force" in refused.output


def test_cli_sweep_bad_input_is_one_line_exit_2(gpt2_dir, tmp_path):
    bad = write(tmp_path / "bad.csv", "prompt,explicit_entity,answer\nP,M,A\n")
    runner = CliRunner()
    result = runner.invoke(_group(), ["sweep", str(bad), "--model", str(gpt2_dir)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "obscure_sentence" in lines[0]
    result = runner.invoke(
        _group(), ["sweep", str(bad), "--prompt-column", "prompt", "--tau", "1-"]
    )
    assert result.exit_code == 2 and "cannot read tau spec" in result.output
    result = runner.invoke(_group(), ["sweep", str(bad), "--output", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "unknown output format" in result.output
    result = runner.invoke(_group(), ["sweep", str(bad), "--baselines", "prompted"])
    assert result.exit_code == 2 and "unknown baseline 'prompted'" in result.output


def test_cli_sweep_row_errors_name_the_file(gpt2_dir, tmp_path):
    """Issue 26: "row 1: … longer than the model's context" alone does not say which
    file's row 1."""
    long = " ".join(["word"] * 400)
    bad = write(
        tmp_path / "rows.csv",
        f'obscure_sentence,explicit_entity,answer\nShort prompt,M,A\n"{long}",M,A\n',
    )
    args = ["sweep", str(bad), "--model", str(gpt2_dir), "--layers", "0", "--tau", "1"]
    result = CliRunner().invoke(_group(), [*args, "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: row 1: "), lines
    assert "longer than the model's context" in lines[0]


@pytest.mark.slow
def test_toyworld_sweep_matches_reference(tmp_path):
    from meminject import toyworld
    from meminject.default_plugins.datasets import load_toyworld
    from meminject.loading import load_model

    if not (Path(toyworld.WEIGHTS_DIR) / "model.safetensors").is_file():
        pytest.skip("toyworld's weights are not built in this checkout")
    model = load_model("toyworld")
    rows = load_toyworld(limit=8)
    config = SweepConfig(
        layers=(0, model.dims.n_layers - 1), taus=(2.0,), encodings=("unembed", "embed"),
        controls=1, batch_size=4,
    )  # fmt: skip
    result = run_sweep(model, rows, config)
    assert_matches_reference(model, rows, result.records, "first-token")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the paper's data is not in this workplace")
def test_the_papers_handwritten_csv_runs_end_to_end(gpt2):
    """The loader and the answer tokenization on the real file (with GPT-2's tokenizer)."""
    rows = load_csv(SHARED_DATA / "handwritten_obscure_explicit_data.csv", limit=20)
    assert len(rows) == 20
    tok = gpt2.tokenizer
    for row in rows:
        assert answer_tokens(gpt2, row.prompt, row.answer) == tok.encode(
            " " + row.answer, add_special_tokens=False
        )
    config = SweepConfig(layers=(0, 1), taus=(1.0, 4.0), encodings=("unembed",), controls=1)
    result = run_sweep(gpt2, rows, config)
    assert len(result.records) == 20 * 2 * 2 * 3
    sample = result.records[result.records["row_id"].isin([0, 7, 19])]
    assert_matches_reference(gpt2, rows, sample, "first-token")


class _Interrupt(Exception):
    pass


def _interrupted_run(model, config, rows=ROWS):
    """Run until the first checkpoint, keep what it wrote, then 'crash'."""
    saved = {}

    def checkpoint(records):
        saved["records"] = records.copy()
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_sweep(model, rows, config, checkpoint=checkpoint)
    return saved["records"]


def test_resumed_sweep_skips_finished_rows_and_equals_an_uninterrupted_run(gpt2):
    config = SweepConfig(
        layers=(0, 1), taus=(1.0, 3.0), encodings=("unembed",), controls=1, batch_size=2
    )
    whole = run_sweep(gpt2, ROWS, config)
    partial = _interrupted_run(gpt2, config)
    assert partial["row_id"].nunique() == 2  # one batch of two prompts survived
    resumed = run_sweep(gpt2, ROWS, config, done=partial)
    assert resumed.stats["resumed_rows"] == 2
    assert resumed.stats["base_passes"] == 2  # the 3 other prompts: batches of 2 and 1
    keys = ["row_id", "layer", "tau", "encoding", "kind", "control"]
    a = resumed.records.sort_values(keys).reset_index(drop=True)
    b = whole.records.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        a[[*keys, "memory"]], b[[*keys, "memory"]], check_categorical=False
    )
    np.testing.assert_allclose(a["p_after"], b["p_after"], rtol=1e-6)


def test_resume_refuses_partial_results_of_other_settings(gpt2):
    config = SweepConfig(layers=(0, 1), taus=(1.0, 3.0), encodings=("unembed",), batch_size=2)
    partial = _interrupted_run(gpt2, config)
    other = SweepConfig(layers=(0, 1), taus=(1.0, 5.0), encodings=("unembed",), batch_size=2)
    with pytest.raises(BadInputError, match="partial results were made with other settings"):
        run_sweep(gpt2, ROWS, other, done=partial)
    fewer = dataclasses.replace(config, baselines=("in-context",))
    with pytest.raises(BadInputError, match="baselines: in-context, shuffled instead of in-cont"):
        run_sweep(gpt2, ROWS, fewer, done=partial)


def test_a_dataset_with_one_memory_has_no_shuffled_baseline(gpt2):
    """Nothing to shuffle: the baseline is dropped (the config says so), in-context stays."""
    rows = [dataclasses.replace(row, memory="Paris") for row in ROWS[:3]]
    config = SweepConfig(layers=(1,), taus=(2.0,), encodings=("unembed",), controls=1)
    result = run_sweep(gpt2, rows, config)
    assert result.config.baselines == ("in-context",)
    assert set(result.records["kind"].astype(str)) == {"memory", "control"}
    assert result.records["logp_in_context"].notna().all()
    assert math.isnan(result.summary["median_vs_shuffled"].iloc[0])


def test_cli_resume_continues_from_the_partial_file(gpt2, gpt2_dir, tmp_path):
    from meminject.sweep import partial_path, write_records

    data = _dataset(tmp_path)
    rows = load_csv(data)
    out = tmp_path / "records.csv"
    config = SweepConfig(
        layers=(0, 1), taus=(1.0, 4.0), encodings=("unembed",), controls=0, batch_size=2
    )
    write_records(_interrupted_run(gpt2, config, rows), partial_path(out), force=True)
    args = [
        "sweep",
        str(data),
        "--model",
        str(gpt2_dir),
        "--layers",
        "0-1",
        "--tau",
        "1,4",
        "--encoding",
        "unembed",
        "--controls",
        "0",
        "--batch-size",
        "2",
        "--output",
        str(out),
        "--no-progress",
    ]
    refused = CliRunner().invoke(_group(), args)
    assert refused.exit_code == 2
    assert "holds an interrupted sweep; pass --resume" in refused.output
    done = CliRunner().invoke(_group(), [*args, "--resume"])
    assert done.exit_code == 0, done.output
    assert not partial_path(out).exists()
    records = read_records(out)
    expected = run_sweep(gpt2, rows, config).records
    assert sorted(records["row_id"].unique()) == sorted(expected["row_id"].unique())
    assert len(records) == len(expected)


def test_cli_head_sweep_on_toyworld_reports_shares_and_a_held_out_check(toyworld, tmp_path):
    """A head sweep over toyworld's 224 held-out prompts: one row per head, the share of
    the memory each head can write, the winner's held-out check and the family-wise
    test, whose numbers are those of sweep.stats.held_out_check and
    sweep.familywise.familywise_test on the written records."""
    from meminject.sweep.stats import held_out_check

    out = tmp_path / "heads.parquet"
    args = [
        "sweep", "toyworld", "--layers", "0", "--tau", "2", "--encoding", "embed",
        "--heads", "0,1", "--controls", "1", "--output", str(out), "--no-progress",
        "--plot", str(tmp_path / "heads.png"),
    ]  # fmt: skip
    result = CliRunner().invoke(_group(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert sorted(records["head"].unique()) == [0, 1]
    assert "share" in result.output and "‖v·P_h‖/‖v‖" in result.output
    chance = (toyworld.facts.d_head / toyworld.dims.d_model) ** 0.5
    assert f"√(d_head/d_model): {chance:.2f} for a random vector" in " ".join(result.output.split())
    # Through CSV too: empty head shares and norms come back as numbers (NaN), not text.
    from meminject.sweep import write_records

    write_records(records, tmp_path / "heads.csv")
    again = read_records(tmp_path / "heads.csv")
    np.testing.assert_allclose(again["head_share"], records["head_share"], rtol=1e-6)
    assert again["resid_norm"].isna().all()
    pd.testing.assert_frame_equal(
        summarize(again)[["median_gain", "head_share"]],
        summarize(records)[["median_gain", "head_share"]],
        rtol=1e-6,
    )
    flat_output = " ".join(result.output.split())
    check = held_out_check(records)
    assert check is not None and check["n_selection"] == check["n_held_out"] == 112
    assert "held-out check" in result.output
    if check["cell"] is not None:
        assert "on the other 112 (halves split by memory)" in result.output.replace("\n", " ")
        assert f"{check['cell']['held_out_median_gain']:+.3f}" in result.output.replace("\n", "")
    # The best cell's baselines, accuracy and known-fact lines, from its summary row.
    if "best cell by" in flat_output:
        best = summarize(records).sort_values("median_gain").iloc[-1]
        assert f"{best['share_explicit_known']:.0%} of them (top 1)" in flat_output
        assert f"{best['top1_after']:.0%} with it" in flat_output
        assert "(shuffled): " + f"{best['median_vs_shuffled']:+.3f}" in flat_output
    # 224 prompts share 14 memories: the family-wise test flips memories, not prompts.
    from meminject.sweep.familywise import familywise_test

    test = familywise_test(records)
    assert (test.units, test.n_units, len(test.cells)) == ("memories", 14, 2)
    flat = " ".join(result.output.split())
    assert "sign flips of 14 memories, max-t over 2 cells" in flat
    assert f"adjusted p = {test.cells['p_adjusted'].iloc[0]:.3g}" in flat


def test_layer_encoding_of_head_cells_is_read_where_it_is_added(tmp_path):
    """Gemma 3 normalises the attention output before the residual add; a head cell adds
    to the heads' sum before that norm, so its ``layer`` vector is read there too (after
    the norm, the norm would undo τ). Whole-layer cells still read the attention output.
    A head sweep with that encoding equals the reference loop through the engine."""
    from meminject.loading import load_model
    from meminject.sweep.encoding import encode_text
    from meminject.testing import build_tiny_model

    model = load_model(build_tiny_model(tmp_path / "gemma3", "gemma3"))
    assert model.post_sublayer_norms
    tokens = torch.tensor([model.tokenize("Paris")])
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens)
    before_norm = cache["blocks.1.attn.hook_out"][0, -1].float()
    after_norm = cache["blocks.1.hook_attn_out"][0, -1].float()
    assert not torch.allclose(before_norm, after_norm, rtol=1e-2)
    for head, expected in ((0, before_norm), (None, after_norm)):
        got = encode_text(model, "Paris", layer=1, encoding="layer", head=head).float()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    config = SweepConfig(
        layers=(1,), taus=(1.0, 4.0), encodings=("layer",), heads=(0, 1), controls=1
    )
    records = run_sweep(model, ROWS[:3], config).records
    assert_matches_reference(model, ROWS[:3], records, "first-token")
    # τ moves the result: the norm no longer normalises the injection away.
    by_tau = records[records["kind"] == "memory"].groupby("tau")["logp_after"].apply(list)
    assert max(abs(a - b) for a, b in zip(by_tau[1.0], by_tau[4.0], strict=True)) > 1e-3


def _rank_and_logp(model, row, memory=None):
    """By hand: the answer's first-token rank and log p after the prompt, from a plain
    forward pass (inside ``meminject.inject`` with ``memory`` when given)."""
    from meminject.engine import inject
    from meminject.memfile import LoadedFile, MemoryEntry, MemorySet
    from meminject.sweep.rows import tokenize_row

    tokenized = tokenize_row(model, row)
    tokens = torch.tensor([tokenized.input_ids])
    with torch.no_grad():
        if memory is None:
            logits = model.bridge(tokens)
        else:
            where = Path("<test>")
            entry = MemoryEntry(memory, where, 0, "")
            with inject(model, MemorySet(files=(LoadedFile(where, None, (entry,)),))):
                logits = model.bridge(tokens)
    last = logits[0, tokenized.read_positions[0]].float()
    target = tokenized.targets[0]
    rank = int((last > last[target]).sum()) + 1
    return rank, float(last.log_softmax(-1)[target])


def test_ranks_and_the_explicit_baseline_by_hand(toyworld):
    """toyworld's rows carry explicit one-hop prompts: the explicit baseline scores them
    (log p and rank by a plain pass), ranks before and after equal a pass by hand, and
    the summary's top-1 shares, known-fact split and gap closed follow from the records."""
    from meminject.default_plugins.datasets import load_toyworld
    from meminject.sweep.encoding import sweep_memory

    rows = load_toyworld()[::19]  # 12 rows, several memories
    config = SweepConfig(layers=(0,), taus=(3.0,), encodings=("embed",), controls=1)
    result = run_sweep(toyworld, rows, config)
    assert result.config.baselines == ("in-context", "shuffled", "explicit")
    records = result.records
    memory = records[records["kind"] == "memory"].set_index("row_id")
    for row in rows[:4]:
        rec = memory.loc[row.row_id]
        explicit = dataclasses.replace(row, prompt=row.explicit_prompt)
        assert (rec["rank_explicit"], rec["logp_explicit"]) == pytest.approx(
            _rank_and_logp(toyworld, explicit), abs=1e-4
        )
        assert (rec["rank_before"], rec["logp_before"]) == pytest.approx(
            _rank_and_logp(toyworld, row), abs=1e-4
        )
        added = sweep_memory(row.memory, layer=0, tau=3.0, encoding="embed")
        assert (rec["rank_after"], rec["logp_after"]) == pytest.approx(
            _rank_and_logp(toyworld, row, added), abs=1e-4
        )
    cell = result.summary.iloc[0]
    assert cell["top1_after"] == pytest.approx((memory["rank_after"] == 1).mean())
    assert cell["top5_after"] == pytest.approx((memory["rank_after"] <= 5).mean())
    known = memory["rank_explicit"] == 1
    assert cell["share_explicit_known"] == pytest.approx(known.mean())
    assert known.mean() > 0.5  # toyworld knows its one-hop facts
    gain = paired(records).set_index("row_id")["gain"]
    assert cell["median_gain_known"] == pytest.approx(gain[known[gain.index].to_numpy()].median())
    gap = memory["logp_explicit"] - memory["logp_before"]
    closed = ((memory["logp_after"] - memory["logp_before"]) / gap)[gap > 0]
    assert cell["median_gap_closed"] == pytest.approx(closed.median())


def test_controls_take_the_memory_length_or_their_own(gpt2):
    """Absolute τ: controls rescaled to their row memory's length (the default) or kept at
    their own; each equals the plain loop, and the choice changes the controls only."""
    common = dict(layers=(1,), taus=(4.0,), controls=2, baselines=())
    matched = run_sweep(gpt2, ROWS[:3], SweepConfig(**common)).records
    own = run_sweep(gpt2, ROWS[:3], SweepConfig(**common, control_norm="own")).records
    assert set(matched["control_norm"]) == {"memory"} and set(own["control_norm"]) == {"own"}
    assert_matches_reference(gpt2, ROWS[:3], matched, "first-token")
    assert_matches_reference(gpt2, ROWS[:3], own, "first-token")
    is_control = matched["kind"] == "control"
    assert (matched.loc[~is_control, "p_after"] == own.loc[~is_control, "p_after"]).all()
    moved = (matched.loc[is_control, "logp_after"] - own.loc[is_control, "logp_after"]).abs()
    assert moved.max() > 0.01  # the rescaling reaches the controls' outcomes (nats)


def test_rescaled_controls_have_their_memory_length():
    from meminject.sweep.replay import controls_at_memory_length

    stacked = torch.randn(4, 3, 8)  # memory, shuffled, two controls; 3 rows
    out = controls_at_memory_length(stacked, first=2)
    assert torch.equal(out[:2], stacked[:2])
    lengths = out.norm(dim=-1)
    assert torch.allclose(lengths[2:], lengths[0].expand(2, 3), rtol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(out[2:], stacked[2:], dim=-1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-6)
