"""Issue 27, defect 1: what ``learn`` reports is what ``generate`` gives for the written file.

For a spread of targets, layers, sites and gates on toyworld, ``meminject learn`` writes a
file and prints the target's probability with it; ``meminject generate -m FILE PROMPT``
(the KV cache on, the default backend) must show the same probability, the target as its
top-1 token, and the target ahead of the runner-up by at least ``--margin``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from meminject.cli import cli

pytestmark = pytest.mark.integration

REPORTED = re.compile(
    r"p\('(?P<token>[^']*)'\) (?P<before>< top 20|[0-9.]+) -> (?P<after>[0-9.]+) "
    r"with the written file"
    r".*margin (?P<margin>-?[0-9.]+) nats"
)

CASES = [
    # The example: the smallest α for top-1 left " Rimesh" ahead in the file.
    ("the capital of", " speak", 1, "attn_out", "projection"),
    ("The capital of Vreduthur is", "Shigosmir", 2, "resid_pre", "projection"),
    ("The leader of Vreduthur is", " speak", 0, "mlp_out", "projection"),
    ("The language spoken in Vreduthur is", "Geindor", 3, "resid_post", "projection"),
    ("The capital of Vreduthur is", "Zokian", 1, "mlp_post", "cosine"),
    ("the capital of", " speak", 2, "attn_z", "distance"),
    ("The leader of Vreduthur is", "Shigosmir", 3, "resid_mid", "cosine"),
]


def run(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(("prompt", "target", "layer", "site", "gate"), CASES)
def test_learn_reports_what_generate_gives(tmp_path: Path, prompt, target, layer, site, gate):
    out = tmp_path / "m.toml"
    printed = run(
        [
            "learn",
            prompt,
            "--target",
            target,
            "--layer",
            str(layer),
            "--site",
            site,
            "--gate",
            gate,
            "--model",
            "toyworld",
            "--output",
            str(out),
        ]
    )
    found = REPORTED.search(printed)
    assert found is not None, printed
    token = found["token"]
    assert float(found["margin"]) >= 0.5
    shown = run(
        ["generate", prompt, "-m", str(out), "--show-top", "20", "--json", "--max-new-tokens", "1"]
    )
    record = json.loads(shown.splitlines()[-1])
    top = record["top_next"]
    assert top[0]["token"] == token, (printed, top[:3])
    assert record["completion"].startswith(token)
    assert f"{top[0]['prob']:.4f}" == found["after"]
    # The margin generate shows (first token) is the one learn reported, and reaches 0.5.
    margin = math.log(top[0]["prob"]) - math.log(top[1]["prob"])
    assert margin == pytest.approx(float(found["margin"]), abs=2e-3)
    assert margin >= 0.5 - 1e-6
    # The probability without the memory is generate's too.
    plain = json.loads(
        run(
            [
                "generate",
                prompt,
                "--model",
                "toyworld",
                "--show-top",
                "20",
                "--json",
                "--max-new-tokens",
                "1",
            ]
        ).splitlines()[-1]
    )
    before = next((t["prob"] for t in plain["top_next"] if t["token"] == token), None)
    if before is not None:
        assert f"{before:.4f}" == found["before"]


def test_a_larger_margin_is_kept_by_the_written_file(tmp_path: Path):
    out = tmp_path / "m.toml"
    printed = run(
        [
            "learn",
            "the capital of",
            "--target",
            " speak",
            "--layer",
            "1",
            "--site",
            "attn_out",
            "--margin",
            "2",
            "--model",
            "toyworld",
            "--output",
            str(out),
        ]
    )
    found = REPORTED.search(printed)
    assert found is not None and float(found["margin"]) >= 2.0, printed
    record = json.loads(
        run(
            [
                "generate",
                "the capital of",
                "-m",
                str(out),
                "--show-top",
                "2",
                "--json",
                "--max-new-tokens",
                "1",
            ]
        ).splitlines()[-1]
    )
    top = record["top_next"]
    assert top[0]["token"] == " speak"
    assert math.log(top[0]["prob"]) - math.log(top[1]["prob"]) >= 2.0 - 1e-6


def test_a_given_alpha_that_misses_the_margin_is_refused_and_nothing_written(tmp_path: Path):
    out = tmp_path / "m.toml"
    result = CliRunner().invoke(
        cli,
        [
            "learn",
            "the capital of",
            "--target",
            " speak",
            "--layer",
            "1",
            "--site",
            "attn_out",
            "--alpha",
            "0.0917",
            "--model",
            "toyworld",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "does not make the target top-1 by the margin" in result.output
    assert "nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--margin", "0"], "--margin must be a finite number above 0, got 0.0"),
        (["--margin", "nan"], "--margin must be a finite number above 0, got nan"),
        (["--boundary", "1"], "--boundary: boundary of the 'projection' gate must be in (0, 1)"),
        (
            ["--gate", "cosine", "--boundary", "1.5"],
            "--boundary: min_cosine of the 'cosine' gate must be in (0, 1)",
        ),
        (["--grid", "0.5-1.5:0.5"], "--grid: boundary of the 'projection' gate must be in (0, 1)"),
    ],
)
def test_bad_margins_and_gate_values_are_one_line_errors(tmp_path: Path, extra, message):
    out = tmp_path / "m.toml"
    result = CliRunner().invoke(
        cli,
        ["learn", "the capital of", "--target", " speak", "--layer", "1", "--site", "attn_out",
         "--model", "toyworld", "--output", str(out), *extra],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []
