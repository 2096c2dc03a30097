"""The generate and validate commands on a tiny real model (DESIGN §7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from meminject.cli import cli
from meminject.generation import generate
from meminject.models import load_model
from tests.conftest import write

pytestmark = pytest.mark.integration

PROMPT = "The first president of the United States fought in the"


@pytest.fixture
def memory_dir(tmp_path: Path, gpt2_dir: Path) -> Path:
    write(
        tmp_path / "mem" / "a.toml",
        f"""version = 1
[model]
name = "{gpt2_dir}"
d_model = 64
n_layers = 2

[[memory]]
name = "first-president"
text = "George Washington"
layer = 1
head = 2
"τ" = 8.0
""",
    )
    return tmp_path / "mem"


def test_generate_compare_json(memory_dir: Path, gpt2_dir: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            PROMPT,
            "-m",
            str(memory_dir),
            "--compare",
            "--json",
            "--max-new-tokens",
            "6",
            "--top-k",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["memories"] == ["first-president"]
    assert payload["model"] == str(gpt2_dir)  # taken from the files' [model]
    model = load_model(gpt2_dir)
    baseline = generate(model, PROMPT, max_new_tokens=6, top_k=3)
    injected = generate(model, PROMPT, memory_dir, max_new_tokens=6, top_k=3)
    assert payload["baseline"]["new_tokens"] == baseline.new_tokens
    assert payload["injected"]["new_tokens"] == injected.new_tokens
    assert payload["baseline"]["new_tokens"] != payload["injected"]["new_tokens"]
    assert [t["token_id"] for t in payload["injected"]["top_next"]] == [
        t.token_id for t in injected.top_next
    ]


def test_generate_compare_table(memory_dir: Path) -> None:
    result = CliRunner().invoke(
        cli, ["generate", PROMPT, "-m", str(memory_dir), "--compare", "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "injected" in result.output
    assert "memories: first-president" in result.output
    assert result.output.count("next #") == 5


def test_validate_with_model_checks_ranges(memory_dir: Path, gpt2_dir: Path) -> None:
    ok = CliRunner().invoke(cli, ["validate", str(memory_dir), "--model", str(gpt2_dir)])
    assert ok.exit_code == 0, ok.output
    assert f"ok: 1 memory in 1 file (schema and model '{gpt2_dir}')" in ok.output
    path = memory_dir / "a.toml"
    path.write_text(path.read_text().replace("layer = 1", "layer = 7"))
    bad = CliRunner().invoke(cli, ["validate", str(memory_dir), "--model", str(gpt2_dir)])
    assert bad.exit_code == 2
    assert bad.stderr == (
        f"Error: {path}:10: memory 'first-president': field 'layer': layer 7 "
        "is out of range; the model has 2 layers (0–1)\n"
    )


def test_model_table_mismatch_is_reported(memory_dir: Path, gpt2_dir: Path) -> None:
    path = memory_dir / "a.toml"
    path.write_text(path.read_text().replace("d_model = 64", "d_model = 768"))
    result = CliRunner().invoke(cli, ["generate", "hi", "-m", str(memory_dir)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {path}:4: field 'model.d_model': [model] d_model = 768 "
        "but the loaded model has 64\n"
    )


def test_head_out_of_range(memory_dir: Path, gpt2_dir: Path) -> None:
    path = memory_dir / "a.toml"
    path.write_text(path.read_text().replace("head = 2", "head = 4"))
    result = CliRunner().invoke(cli, ["generate", "hi", "-m", str(memory_dir)])
    assert result.exit_code == 2
    assert "field 'head': head 4 is out of range; the model has 4 heads (0–3)" in result.stderr


def test_debug_shows_the_traceback(memory_dir: Path) -> None:
    path = memory_dir / "a.toml"
    path.write_text("version = 1\n")
    plain = CliRunner().invoke(cli, ["validate", str(path)])
    debug = CliRunner().invoke(cli, ["--debug", "validate", str(path)])
    assert plain.exit_code == 2 and "Traceback" not in plain.output
    assert debug.exception is not None and type(debug.exception).__name__ == "MemoryFileError"


def test_layer_encoder_rejects_text_longer_than_context(tmp_path: Path, gpt2_dir: Path) -> None:
    text = "word " * 200
    path = write(
        tmp_path / "long.toml",
        f'version = 1\n[[memory]]\nname = "long"\n'
        f'text = "{text}"\nencoding = "layer"\nlayer = 0\ntau = 1.0\n',
    )
    result = CliRunner().invoke(cli, ["generate", "hi", "-m", str(path), "--model", str(gpt2_dir)])
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"Error: {path}:4: memory 'long': field 'text': the text is "
        "202 tokens, longer than the model's context of 128"
    )
