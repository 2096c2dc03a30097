"""Issue 27, defect 1, on SmolLM2-135M: the probability ``learn`` reports for the file it
wrote is the one ``generate`` gives for that file, and the target leads by the margin.

Cases span targets, sites, layers and gates (the blog's Tokyo → Kathmandu edit at its
attention and MLP sites, a made-up Eiffel Tower → Rome at the residual stream). The last
case runs the command line both ways, so the CLI's model load is covered too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from meminject.cli import cli
from meminject.generation import generate
from meminject.learn import DEFAULT_MARGIN, fit_and_write

pytestmark = pytest.mark.realmodel

TOKYO = "The city of Tokyo lies in the country of"
CASES = [
    (TOKYO, " Kathmandu", 22, "attn_z", "projection"),
    (TOKYO, " Kathmandu", 18, "mlp_post", "cosine"),
    ("The Eiffel Tower is in the city of", " Rome", 10, "resid_pre", "distance"),
]


@pytest.mark.parametrize(("prompt", "target", "layer", "site", "gate"), CASES)
def test_reported_probability_is_generates(
    smollm2, tmp_path: Path, prompt, target, layer, site, gate
):
    fitted = fit_and_write(
        smollm2,
        prompt,
        target,
        tmp_path / "m.toml",
        layer=layer,
        site=site,
        name="m",
        gate=gate,
        max_steps=3,
    )
    shown = generate(smollm2, prompt, [fitted.paths[0]], max_new_tokens=1, show_top=2)
    first = smollm2.continuation_ids(target)[0]
    assert shown.new_tokens == [first]
    assert shown.top_next[0].token_id == first
    assert shown.top_next[0].prob == fitted.score.prob_after
    margin = math.log(shown.top_next[0].prob) - math.log(shown.top_next[1].prob)
    assert margin == pytest.approx(fitted.score.margin, abs=1e-4)
    assert margin >= DEFAULT_MARGIN - 1e-6


def test_the_command_line_reports_what_generate_shows(smollm2, tmp_path: Path):
    del smollm2  # loaded by the fixture once; the commands load their own copy
    out = tmp_path / "m.toml"
    learned = CliRunner().invoke(
        cli,
        ["learn", TOKYO, "--target", "Kathmandu", "--layer", "18", "--site", "mlp_post",
         "--gate", "distance", "--model", "smollm2-135m", "-q", "--output", str(out)],
    )  # fmt: skip
    assert learned.exit_code == 0, learned.output
    found = re.search(r"-> ([0-9.]+) with the written file.*margin ([0-9.]+) nats", learned.output)
    assert found is not None, learned.output
    result = CliRunner().invoke(
        cli, ["generate", TOKYO, "-m", str(out), "--show-top", "2", "--json", "-q",
              "--max-new-tokens", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    top = json.loads(result.output.splitlines()[-1])["top_next"]
    assert f"{top[0]['prob']:.4f}" == found[1]
    assert math.log(top[0]["prob"]) - math.log(top[1]["prob"]) >= DEFAULT_MARGIN - 1e-6
