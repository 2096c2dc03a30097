"""Malformed memory files and the exact one-line error each must give (docs/memory-files.md#errors).

``{f}`` stands for the file's path. The same table runs through the Python loader
and through ``meminject validate`` (exit code 2, one line on stderr).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meminject.cli import cli
from meminject.errors import MemoryFileError
from meminject.loading import load_memories
from meminject.plugins import get_registry

OK = '[[memory]]\nname = "m"\ntext = "Paris"\nlayer = 1\ntau = 2.0\n'
GATED = (
    '[[memory]]\nname = "g"\nstrategy = "gated"\nsite = "resid_pre"\nlayer = 1\n'
    'tensors = "g.safetensors"\n'
)

CASES: list[tuple[str, str, str]] = [
    (
        "toml-syntax",
        'version = 1\n[[memory]]\nname = "m\n',
        "{f}:3: invalid TOML: Illegal character '\\n'",
    ),
    (
        "toml-duplicate-key",
        "version = 1\nversion = 1\n" + OK,
        "{f}:2: invalid TOML: Cannot overwrite a value",
    ),
    (
        "unquoted-tau-symbol",
        "version = 1\n" + OK.replace("tau = 2.0", "τ = 2.0"),
        "{f}:6: invalid TOML: Invalid statement",
    ),
    ("missing-version", OK, "{f}: field 'version': required field is missing"),
    (
        "version-2",
        "version = 2\n" + OK,
        "{f}:1: field 'version': unsupported version 2; this meminject reads version 1",
    ),
    (
        "version-string",
        'version = "1"\n' + OK,
        "{f}:1: field 'version': unsupported version '1'; this meminject reads version 1",
    ),
    ("no-memories", "version = 1\n", "{f}: field 'memory': required field is missing"),
    (
        "empty-memory-list",
        "version = 1\nmemory = []\n",
        "{f}:2: field 'memory': List should have at least 1 item after validation, not 0",
    ),
    (
        "unknown-top-level-key",
        "version = 1\nmemories = 3\n" + OK,
        "{f}:2: field 'memories': unknown key 'memories'; did you mean 'memory'?",
    ),
    (
        "unknown-memory-key",
        "version = 1\n" + OK + "tua = 3.0\n",
        "{f}:7: memory 'm': field 'tua': unknown key 'tua'; did you mean 'tau'?",
    ),
    (
        "typo-replaces-required",
        "version = 1\n" + OK.replace("tau =", "taux ="),
        "{f}:6: memory 'm': field 'taux': unknown key 'taux'; did you mean 'tau'? "
        "(and 1 more problem)",
    ),
    (
        "missing-name",
        "version = 1\n" + OK.replace('name = "m"\n', ""),
        "{f}:2: memory #1: field 'name': required field is missing",
    ),
    (
        "missing-text",
        "version = 1\n" + OK.replace('text = "Paris"\n', ""),
        "{f}:2: memory 'm': field 'text': required field is missing",
    ),
    (
        "missing-layer",
        "version = 1\n" + OK.replace("layer = 1\n", ""),
        "{f}:2: memory 'm': field 'layer': required field is missing",
    ),
    (
        "missing-tau",
        "version = 1\n" + OK.replace("tau = 2.0\n", ""),
        "{f}:2: memory 'm': field 'tau': required field is missing",
    ),
    (
        "newline-in-name",
        "version = 1\n" + OK.replace('"m"', '"a\\nb"'),
        "{f}:3: memory #1: field 'name': String should match pattern "
        "'^[A-Za-z0-9][A-Za-z0-9_.\\-]*$', got 'a\\nb'",
    ),
    (
        "empty-text",
        "version = 1\n" + OK.replace('"Paris"', '""'),
        "{f}:4: memory 'm': field 'text': String should have at least 1 character, got ''",
    ),
    (
        "bad-name",
        "version = 1\n" + OK.replace('"m"', '"has space"'),
        "{f}:3: memory #1: field 'name': String should match pattern "
        "'^[A-Za-z0-9][A-Za-z0-9_.\\-]*$', got 'has space'",
    ),
    (
        "negative-layer",
        "version = 1\n" + OK.replace("layer = 1", "layer = -1"),
        "{f}:5: memory 'm': field 'layer': Input should be greater than or equal to 0, got -1",
    ),
    (
        "layer-float",
        "version = 1\n" + OK.replace("layer = 1", "layer = 1.5"),
        "{f}:5: memory 'm': field 'layer': Input should be a valid integer, got 1.5",
    ),
    (
        "tau-string",
        "version = 1\n" + OK.replace("tau = 2.0", 'tau = "big"'),
        "{f}:6: memory 'm': field 'tau': Input should be a valid number, got 'big'",
    ),
    (
        "tau-nan",
        "version = 1\n" + OK.replace("tau = 2.0", "tau = nan"),
        "{f}:6: memory 'm': field 'tau': must be a finite number",
    ),
    (
        "tau-inf",
        "version = 1\n" + OK.replace("tau = 2.0", "tau = inf"),
        "{f}:6: memory 'm': field 'tau': must be a finite number",
    ),
    (
        "tau-and-symbol",
        "version = 1\n" + OK + '"τ" = 3.0\n',
        "{f}:7: memory 'm': field 'τ': key 'τ' repeats a field already given under another name",
    ),
    (
        "negative-head",
        "version = 1\n" + OK + "head = -2\n",
        "{f}:7: memory 'm': field 'head': Input should be greater than or equal to 0, got -2",
    ),
    (
        "head-with-wrong-site",
        "version = 1\n" + OK + 'head = 1\nsite = "resid_pre"\n',
        "{f}:7: memory 'm': field 'head': 'head' is only valid with site 'attn_result' or "
        "'attn_z', not 'resid_pre'",
    ),
    (
        "attn-result-without-head",
        "version = 1\n" + OK + 'site = "attn_result"\n',
        "{f}:7: memory 'm': field 'site': site 'attn_result' needs a 'head'; use 'attn_out' for "
        "the layer",
    ),
    (
        "unknown-site",
        "version = 1\n" + OK + 'site = "attn_zz"\n',
        "{f}:7: memory 'm': field 'site': Input should be 'attn_result', 'attn_out', 'attn_z', "
        "'resid_pre', 'resid_mid', 'resid_post' or 'mlp_out', got 'attn_zz'",
    ),
    (
        "unknown-encoding",
        "version = 1\n" + OK + 'encoding = "unembedd"\n',
        "{f}:7: memory 'm': field 'encoding': unknown encoding 'unembedd'; did you mean "
        "'unembed'? registered: unembed, embed, layer{plugins_off}",
    ),
    (
        "params-for-paramless-encoder",
        "version = 1\n" + OK + "[memory.params]\nscale = 2\n",
        "{f}:7: memory 'm': field 'params': encoder 'unembed' takes no params",
    ),
    (
        "unknown-strategy",
        "version = 1\n" + OK + 'strategy = "multiply"\n',
        "{f}:2: memory 'm': unknown strategy 'multiply'; registered: add, gated{plugins_off}",
    ),
    (
        "bad-position-word",
        "version = 1\n" + OK + 'positions = "first"\n',
        "{f}:7: memory 'm': field 'positions': Input should be 'all', 'prompt', 'generated' or "
        "'last', got 'first' (and 1 more problem)",
    ),
    (
        "empty-position-list",
        "version = 1\n" + OK + "positions = []\n",
        "{f}:7: memory 'm': field 'positions': an explicit position list must not be empty",
    ),
    (
        "repeated-positions",
        "version = 1\n" + OK + "positions = [1, 1]\n",
        "{f}:7: memory 'm': field 'positions': positions must not repeat",
    ),
    (
        "enabled-string",
        "version = 1\n" + OK + 'enabled = "no"\n',
        "{f}:7: memory 'm': field 'enabled': Input should be a valid boolean, got 'no'",
    ),
    (
        "duplicate-names",
        "version = 1\n" + OK + OK,
        "{f}:8: memory 'm': field 'name': duplicate memory name, already used by memory #1 of {f}",
    ),
    (
        "memory-not-a-table",
        "version = 1\nmemory = [3]\n",
        "{f}:2: memory #1: must be a table, got 3",
    ),
    (
        "gated-boundary-at-1",
        "version = 1\n" + GATED + "boundary = 1.0\n",
        "{f}:8: memory 'g': field 'boundary': Input should be less than 1, got 1.0",
    ),
    (
        "gated-no-boundary",
        "version = 1\n" + GATED,
        "{f}:2: memory 'g': field 'boundary': the 'projection' gate needs 'boundary'",
    ),
    (
        "gated-unknown-gate",
        "version = 1\n" + GATED + 'gate = "dot"\nboundary = 0.5\n',
        "{f}:8: memory 'g': field 'gate': unknown gate 'dot'; registered: projection, cosine, "
        "distance",
    ),
    (
        "gated-other-gates-parameter",
        "version = 1\n" + GATED + 'gate = "cosine"\nmin_cosine = 0.8\nradius = 0.5\n',
        "{f}:10: memory 'g': field 'radius': 'radius' belongs to another gate; the 'cosine' "
        "gate takes 'min_cosine'",
    ),
    (
        "gated-radius-above-1",
        "version = 1\n" + GATED + 'gate = "distance"\nradius = 1.5\n',
        "{f}:9: memory 'g': field 'radius': Input should be less than or equal to 1, got 1.5",
    ),
    (
        "model-unknown-key",
        'version = 1\n[model]\nname = "gpt2"\nwidth = 3\n' + OK,
        "{f}:4: field 'model.width': unknown key 'width'",
    ),
    (
        "model-zero-layers",
        "version = 1\n[model]\nn_layers = 0\n" + OK,
        "{f}:3: field 'model.n_layers': Input should be greater than 0, got 0",
    ),
    (
        "model-bad-coordinates",
        'version = 1\n[model]\ncoordinates = "folded"\n' + OK,
        "{f}:3: field 'model.coordinates': Input should be 'processed' or 'raw', got 'folded'",
    ),
]


@pytest.fixture
def malformed(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str]:
    name, text, expected = request.param
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    # With plugins installed but switched off (the test default), the message says so.
    off = get_registry().plugins_off_note()
    return path, expected.format(f=path, plugins_off=off)


def test_table_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("malformed", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_loader_error_is_exact(malformed: tuple[Path, str]) -> None:
    path, expected = malformed
    with pytest.raises(MemoryFileError) as info:
        load_memories([path])
    assert str(info.value) == expected
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("malformed", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_cli_prints_one_line_and_exits_2(malformed: tuple[Path, str]) -> None:
    path, expected = malformed
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr == f"Error: {expected}\n"
    assert "Traceback" not in result.output
