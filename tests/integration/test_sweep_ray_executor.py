"""Sweeps on Ray (``--executor ray``) against the local sweep, on a local Ray instance
(two CPUs, started once for the module): the same records to the last bit, a resumed
run, progress counted across workers, the command line, and workers that cannot load
the driver's model."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import click
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from meminject.cli import _Group
from meminject.cli.sweep import sweep as sweep_command
from meminject.datasets import PromptRow
from meminject.default_plugins.datasets import load_csv
from meminject.errors import EXIT_BAD_INPUT, BadInputError
from meminject.plugins import get_registry
from meminject.sweep import SweepConfig, read_records, run_sweep, run_sweep_ray
from meminject.sweep.ray_executor import WorkerError, WorkerModel, sweep_task, task_job
from tests.conftest import write

ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install "meminject[ray]"')

from tests.integration.test_sweep import ROWS as SWEEP_ROWS  # noqa: E402

pytestmark = pytest.mark.integration

ROWS = [
    *SWEEP_ROWS,  # the local sweep tests' prompts, and two more for a second batch
    PromptRow("The river that flows through Cairo ends in the", "Nile", "Mediterranean", None, 5),
    PromptRow("The language spoken in Brazil came from", "Portuguese", "Portugal", None, 6),
]


@pytest.fixture(autouse=True, scope="module")
def ray_instance():
    """One local Ray instance for the module (Ray's workers take one torch thread each;
    the driver takes one too, so local and Ray runs compute alike). Token authentication
    is off for this throwaway cluster, and the instance is shut down at the end."""
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    torch.set_num_threads(threads)
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before


def test_workers_import_the_meminject_under_test():
    """Otherwise every comparison below would hold another checkout's code to this one.
    (In CI the package is installed editable from the checkout, so workers import it as
    any program would; a developer's worktree needs PYTHONPATH pointing at it.)"""
    import meminject

    def where() -> str:
        import meminject

        return meminject.__file__

    assert ray.get(ray.remote(where).remote()) == meminject.__file__


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(
            dict(
                arch="gpt2",
                load={},
                config=dict(taus=(0.0, 2.0, 5.0), encodings=("unembed", "layer"), controls=2),
            ),
            id="gpt2-layer-encoding",
        ),
        pytest.param(
            dict(
                arch="llama",
                load=dict(coordinates="raw", prepend_bos=False),
                config=dict(
                    taus=(0.5, 1.0),
                    encodings=("embed",),
                    heads=(0, 3),
                    controls=1,
                    metric="full",
                    tau_units="resid_norm",
                ),
            ),
            id="llama-raw-no-bos-heads-resid-norm",
        ),
    ],
)
def test_ray_sweep_gives_exactly_the_local_records(model_dirs, setup):
    """Every column, every number bit for bit, in the same order: the tasks get whole
    batches of the local batching, and the workers load the model the driver loaded
    (raw coordinates and no BOS here, which are not the defaults)."""
    from meminject.loading import load_model

    model = load_model(model_dirs[setup["arch"]], bridge=True, **setup["load"])
    config = SweepConfig(layers=(0, 1), batch_size=2, **setup["config"])
    local = run_sweep(model, ROWS, config)
    on_ray = run_sweep_ray(model, ROWS, config, tasks=3)
    pd.testing.assert_frame_equal(on_ray.records, local.records, check_exact=True)
    assert on_ray.records["pct_change"].abs().max() > 1.0  # the injections matter
    for key in ("rows", "cells", "base_passes", "replays", "full_passes", "fallback_batches"):
        assert on_ray.stats[key] == local.stats[key], key
    assert on_ray.stats["tasks"] == 3 and on_ray.stats["workers"] >= 1
    assert on_ray.stats.get("resid_norms") == local.stats.get("resid_norms")


def test_a_shard_of_the_dataset_runs_on_ray_as_it_runs_locally(gpt2):
    config = SweepConfig(
        layers=(1,), taus=(3.0,), encodings=("unembed",), controls=1, batch_size=2, shard=(1, 2)
    )
    on_ray = run_sweep_ray(gpt2, ROWS, config, tasks=2)
    pd.testing.assert_frame_equal(
        on_ray.records, run_sweep(gpt2, ROWS, config).records, check_exact=True
    )
    assert sorted(on_ray.records["row_id"].unique()) == [1, 3, 5]


class _Interrupt(Exception):
    pass


def test_an_interrupted_ray_sweep_resumes_to_the_local_result(gpt2):
    """The first task to finish is checkpointed, then the run 'crashes'; resuming on Ray
    runs only the other rows and gives what resuming locally gives, to the last bit, and
    the uninterrupted run's numbers."""
    config = SweepConfig(
        layers=(0, 1), taus=(1.0, 4.0), encodings=("unembed",), controls=1, batch_size=2
    )
    saved: dict[str, pd.DataFrame] = {}

    def checkpoint(records: pd.DataFrame) -> None:
        saved["partial"] = records.copy()
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_sweep_ray(gpt2, ROWS, config, tasks=4, checkpoint=checkpoint)
    partial = saved["partial"]
    finished = partial["row_id"].nunique()
    assert finished in (1, 2)  # one task: one batch of 2 rows, or the last row alone
    resumed = run_sweep_ray(gpt2, ROWS, config, tasks=2, done=partial)
    assert resumed.stats["resumed_rows"] == finished
    assert resumed.stats["rows"] == len(ROWS) - finished
    pd.testing.assert_frame_equal(
        resumed.records, run_sweep(gpt2, ROWS, config, done=partial).records, check_exact=True
    )
    keys = ["row_id", "layer", "tau", "encoding", "kind", "control"]
    whole = run_sweep(gpt2, ROWS, config).records.sort_values(keys).reset_index(drop=True)
    again = resumed.records.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        again[[*keys, "memory"]], whole[[*keys, "memory"]], check_categorical=False
    )
    pd.testing.assert_series_equal(again["logp_after"], whole["logp_after"], rtol=1e-6)


def test_progress_counts_the_passes_of_every_worker(gpt2, capsys):
    config = SweepConfig(
        layers=(0, 1), taus=(0.0, 2.0), encodings=("unembed",), controls=2, batch_size=2
    )
    result = run_sweep_ray(gpt2, ROWS, config, tasks=3, progress=True)
    # 7 rows in batches of 2; τ = 0 costs no pass. The rows have no explicit prompts, so
    # the run's config (the one returned) has no explicit baseline: its passes are counted.
    assert result.config.baselines == ("in-context", "shuffled")
    total = 4 * result.config.passes_per_batch
    assert result.stats["reference_passes"] == 4  # in-context: one pass per batch
    assert result.stats["replays"] + 4 == total
    err = capsys.readouterr().err
    assert f"{total}/{total} passes" in err
    assert "3/3 tasks" in err


def test_a_progress_counter_that_is_gone_does_not_fail_the_sweep(gpt2, capsys):
    """Progress is a bar, not the result: with the counter actor killed, every task's
    reports and the driver's readings fail, and the sweep still returns the local
    records (the bar counts tasks only)."""
    from meminject.sweep import ray_executor

    config = SweepConfig(layers=(1,), taus=(2.0,), encodings=("unembed",), controls=1, batch_size=2)
    ray.kill(ray_executor._counter(ray))
    try:
        on_ray = run_sweep_ray(gpt2, ROWS, config, tasks=2, progress=True)
    finally:
        ray_executor._COUNTERS.clear()  # the next test gets a live counter
    pd.testing.assert_frame_equal(
        on_ray.records, run_sweep(gpt2, ROWS, config).records, check_exact=True
    )
    assert "2/2 tasks" in capsys.readouterr().err


def test_a_worker_without_the_model_or_with_other_files_refuses(tmp_path):
    """A path that does not exist where the task runs, and one that holds other files
    than the driver loaded: one line each, naming the node, exit 2."""
    from meminject.loading import load_model
    from meminject.testing import build_tiny_model

    config = SweepConfig(layers=(0,), taus=(1.0,), encodings=("unembed",), batch_size=4)
    gone = load_model(build_tiny_model(tmp_path / "gone", "gpt2"), bridge=True)
    shutil.rmtree(tmp_path / "gone")
    with pytest.raises(WorkerError) as missing:
        run_sweep_ray(gone, ROWS[:2], config, tasks=1)
    assert missing.value.exit_code == EXIT_BAD_INPUT
    assert "on node" in str(missing.value) and "no model directory at" in str(missing.value)
    assert "must load on every node" in str(missing.value)

    # Another node's files at the driver's path: a real task, given the job the driver
    # makes for its own model but pointed at a directory of other weights.
    mine = load_model(build_tiny_model(tmp_path / "mine", "gpt2"), bridge=True)
    theirs = build_tiny_model(tmp_path / "theirs", "gpt2", seed=1)
    spec = WorkerModel.of(mine, get_registry())
    job = task_job(dataclasses.replace(spec, name=str(theirs)), mine, config, threads=1)
    rows = [dataclasses.asdict(row) for row in ROWS[:2]]
    out = ray.get(ray.remote(sweep_task).remote(job, rows, (None, "no progress")))
    assert out["exit_code"] == EXIT_BAD_INPUT
    assert "are not the driver's" in out["error"] and out["error"].startswith("on node ")
    assert "put the same files at that path on every node" in out["error"]
    # The same files elsewhere (a copy on another node) are the driver's.
    shutil.copytree(tmp_path / "mine", tmp_path / "copy")
    job = task_job(dataclasses.replace(spec, name=str(tmp_path / "copy")), mine, config, 1)
    out = ray.get(ray.remote(sweep_task).remote(job, rows, (None, "no progress")))
    assert "error" not in out, out.get("error")
    assert out["weights"] == mine.legacy_fingerprint()


def test_tasks_no_node_can_hold_are_refused_before_any_is_sent(gpt2):
    config = SweepConfig(layers=(0,), taus=(1.0,), encodings=("unembed",))
    with pytest.raises(BadInputError, match="no node of the Ray cluster has 3 CPUs for a task"):
        run_sweep_ray(gpt2, ROWS, config, threads=3)  # the instance has 2


def test_workers_process_the_weights_with_the_drivers_thread_count(gpt2_dir):
    """Folding LayerNorm and centring the weights sums floats, and the last bits of the
    processed weights depend on torch's thread count: a driver that loaded with two
    threads gets workers (one thread each) that load with two, and its own records."""
    from meminject.loading import load_model

    torch.set_num_threads(2)
    try:
        model = load_model(gpt2_dir, bridge=True)
    finally:
        torch.set_num_threads(1)
    assert model.load_threads == 2
    one_thread = load_model(gpt2_dir, bridge=True)
    # The weights as processed differ (else this proves nothing); the checkpoint does not.
    assert model.legacy_fingerprint() != one_thread.legacy_fingerprint()
    assert model.fingerprint() == one_thread.fingerprint()
    config = SweepConfig(layers=(0, 1), taus=(4.0,), encodings=("unembed",), batch_size=4)
    on_ray = run_sweep_ray(model, ROWS, config, tasks=2)
    pd.testing.assert_frame_equal(
        on_ray.records, run_sweep(model, ROWS, config).records, check_exact=True
    )
    # When the driver cannot know (a model whose load is not recorded), its workers
    # process the weights with the driver's current count, and the run says its records
    # are not bit for bit the local run's.
    model.load_threads = None
    with pytest.warns(RuntimeWarning, match="differ from the driver's in their last bits"):
        run_sweep_ray(model, ROWS, config, tasks=2)


# --------------------------------------------------------------------------- the command line


def _group() -> click.Group:
    group = _Group(name="meminject")
    group.add_command(sweep_command)
    return group


def _dataset(tmp_path: Path) -> Path:
    lines = ["obscure_sentence,explicit_entity,answer"]
    lines += [f'"{r.prompt}",{r.memory},{r.answer}' for r in ROWS]
    return write(tmp_path / "data.csv", "\n".join(lines) + "\n")


def test_cli_ray_sweep_writes_the_local_records_and_resumes(gpt2, gpt2_dir, tmp_path):
    from meminject.sweep import partial_path, write_records

    data = _dataset(tmp_path)
    args = [
        "sweep", str(data), "--model", str(gpt2_dir), "--layers", "0-1", "--tau", "1,4",
        "--encoding", "unembed,embed", "--controls", "1", "--batch-size", "2",
        "--no-progress",
    ]  # fmt: skip
    local_out, ray_out = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    local = CliRunner().invoke(_group(), [*args, "--output", str(local_out)])
    assert local.exit_code == 0, local.output
    on_ray = CliRunner().invoke(
        _group(), [*args, "--output", str(ray_out), "--executor", "ray", "--tasks", "2"]
    )
    assert on_ray.exit_code == 0, on_ray.output
    assert "on 2 Ray tasks" in on_ray.output
    pd.testing.assert_frame_equal(read_records(ray_out), read_records(local_out), check_exact=True)

    # A run cut short after its first task, resumed on Ray: the same records again.
    config = SweepConfig(
        layers=(0, 1), taus=(1.0, 4.0), encodings=("unembed", "embed"), controls=1, batch_size=2
    )
    saved: dict[str, pd.DataFrame] = {}

    def checkpoint(records: pd.DataFrame) -> None:
        saved["partial"] = records
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_sweep_ray(gpt2, load_csv(data), config, tasks=4, checkpoint=checkpoint)
    out = tmp_path / "resumed.parquet"
    write_records(saved["partial"], partial_path(out), force=True)
    resumed = CliRunner().invoke(
        _group(), [*args, "--output", str(out), "--executor", "ray", "--resume"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert not partial_path(out).exists()
    keys = ["row_id", "layer", "tau", "encoding", "kind", "control"]
    got = read_records(out).sort_values(keys).reset_index(drop=True)
    want = read_records(local_out).sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_categorical=False, rtol=1e-6)


def test_cli_starts_and_stops_a_ray_instance_of_its_own(gpt2, gpt2_dir, tmp_path):
    """The command line's own path: no Ray connection in the process, so it starts a
    local instance, runs, and shuts it down (last in this module: it ends the module's
    instance first). A second Ray cluster in one process must not reuse the first one's
    progress counter (Ray's job ids start again with each cluster)."""
    ray.shutdown()
    out = tmp_path / "own.parquet"
    args = [
        "sweep", str(_dataset(tmp_path)), "--model", str(gpt2_dir), "--layers", "1",
        "--tau", "2", "--encoding", "unembed", "--batch-size", "4", "--no-progress",
        "--executor", "ray", "--output", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(_group(), args)
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized()
    config = SweepConfig(layers=(1,), taus=(2.0,), encodings=("unembed",), batch_size=4)
    pd.testing.assert_frame_equal(
        read_records(out),
        run_sweep(gpt2, load_csv(tmp_path / "data.csv"), config).records,
        check_exact=True,
    )
