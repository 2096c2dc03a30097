"""Where a sweep's records go and how an interrupted one resumes (``SweepFiles``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from meminject.errors import BadInputError
from meminject.sweep.records import SweepFiles, partial_path, read_records, write_records
from tests.unit.test_sweep_stats import HELPS, _records


def test_no_output_needs_no_resume() -> None:
    files = SweepFiles.plan(None)
    assert (files.out, files.partial, files.done) == (None, None, None)
    files.checkpoint(pd.DataFrame())  # nothing to keep, nothing written
    with pytest.raises(BadInputError, match="--resume needs --out"):
        SweepFiles.plan(None, resume=True)


def test_a_partial_file_is_resumed_restarted_or_refused(tmp_path: Path) -> None:
    out = tmp_path / "sweep.csv"
    records = _records({1.0: HELPS})
    files = SweepFiles.plan(out)
    assert files.partial == partial_path(out) == tmp_path / "sweep.partial.csv"
    files.checkpoint(records)
    assert files.partial is not None and files.partial.is_file()
    # An interrupted sweep is never dropped silently.
    with pytest.raises(BadInputError, match="holds an interrupted sweep; pass --resume"):
        SweepFiles.plan(out)
    resumed = SweepFiles.plan(out, resume=True)
    assert resumed.done is not None and len(resumed.done) == len(records)
    assert SweepFiles.plan(out, force=True).done is None
    resumed.finish(records)
    assert not resumed.partial.exists()
    assert len(read_records(out)) == len(records)
    # A finished output is not overwritten without --force.
    with pytest.raises(BadInputError, match="exists; pass --force"):
        SweepFiles.plan(out)


def test_unknown_output_format(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="unknown output format"):
        SweepFiles.plan(tmp_path / "sweep.json")
    records = _records({1.0: HELPS})
    write_records(records, tmp_path / "ok.parquet")
    again = read_records(tmp_path / "ok.parquet")
    assert list(again["row_id"]) == list(records["row_id"])
