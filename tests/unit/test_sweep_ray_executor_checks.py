"""The Ray executor without a model or a Ray instance: how rows are dealt to tasks, and
the command line's refusals, which come before anything loads (with Ray installed or
not: the minimal CI environment has no Ray, and these tests run there too)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from meminject.errors import BadInputError
from meminject.sweep.config import SweepConfig
from meminject.sweep.ray_executor import INSTALL_RAY, ray_installed, task_batches
from meminject.sweep.rows import batch_indices


@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=60),
    batch_size=st.integers(1, 8),
    n_tasks=st.integers(1, 20),
)
def test_tasks_get_whole_batches_that_their_own_batching_gives_back(
    lengths: list[int], batch_size: int, n_tasks: int
) -> None:
    """What keeps a Ray run's numbers the local run's: every task gets whole batches of
    the local batching, and batching a task's rows again (as its run_sweep does) gives
    exactly those batches."""
    batches = batch_indices(lengths, batch_size)
    groups = task_batches(batches, n_tasks)
    assert len(groups) == min(n_tasks, len(batches))
    assert all(groups)  # no task without work
    assert sorted(b for g in groups for b in map(tuple, g)) == sorted(map(tuple, batches))
    for group in groups:
        rows = [i for batch in group for i in batch]
        again = batch_indices([lengths[i] for i in rows], batch_size)
        assert [[rows[k] for k in batch] for batch in again] == group


def test_passes_per_batch_counts_cells_and_controls_but_not_tau_zero() -> None:
    config = SweepConfig(
        layers=(0, 1, 2), taus=(0.0, 1.0, 2.0), encodings=("unembed", "embed"), controls=3
    )
    # Per cell with τ ≠ 0: the memory, the shuffled memory and 3 controls; one pass each
    # for the in-context and the explicit prompts.
    assert config.passes_per_batch == 3 * 2 * 2 * 5 + 2
    bare = SweepConfig(layers=(0, 1, 2), taus=(0.0, 1.0, 2.0), controls=3, baselines=())
    assert bare.passes_per_batch == 3 * 2 * 4
    heads = SweepConfig(layers=(0,), taus=(1.0,), heads=(0, 1, 2), baselines=("shuffled",))
    assert heads.passes_per_batch == 3 * 2
    with pytest.raises(BadInputError, match="unknown baseline 'prompted'; choose in-context"):
        SweepConfig(layers=(0,), taus=(1.0,), baselines=("prompted",))


def _sweep(*args: str):
    from meminject.cli import _Group
    from meminject.cli.sweep import sweep

    group = _Group(name="meminject")
    group.add_command(sweep)
    return CliRunner().invoke(group, ["sweep", "toyworld", *args])


@pytest.mark.parametrize("flag", [["--address", "10.0.0.1:6379"], ["--tasks", "4"]])
def test_ray_options_without_the_ray_executor_are_refused(flag: list[str]) -> None:
    result = _sweep(*flag)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {flag[0]} is an option of --executor ray"]


def test_the_ray_executor_without_ray_says_how_to_install_it() -> None:
    """Ray made unimportable the way Python marks a blocked module (None in
    sys.modules); in the minimal CI environment it is not installed at all."""
    code = textwrap.dedent("""
        import sys
        sys.modules["ray"] = None
        from meminject.cli import main
        main(["sweep", "toyworld", "--executor", "ray"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"Error: --executor ray needs Ray, which is not installed: {INSTALL_RAY}"
    ]


@pytest.mark.skipif(not ray_installed(), reason=f"Ray is not installed ({INSTALL_RAY})")
def test_an_address_where_no_ray_cluster_answers_fails_in_seconds() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _sweep("--executor", "ray", "--address", f"127.0.0.1:{port}")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in lines[0]
    assert "ray start --head" in lines[0]
