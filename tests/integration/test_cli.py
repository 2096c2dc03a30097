"""The generate and validate commands on a tiny real model (docs/architecture.md#command-line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from meminject.cli import cli
from meminject.generation import generate
from meminject.loading import load_model
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
            "--show-top",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    from meminject.schema import GenerationRecord

    # One record per generation, one per line: the baseline, then the injected run.
    base, inj = (GenerationRecord.model_validate_json(x) for x in result.stdout.splitlines())
    assert (base.memories, inj.memories) == ([], ["first-president"])
    assert base.model == inj.model == str(gpt2_dir)  # taken from the files' [model]
    assert base.prompt == inj.prompt == PROMPT and base.id is None
    model = load_model(gpt2_dir)
    baseline = generate(model, PROMPT, max_new_tokens=6, show_top=3)
    injected = generate(model, PROMPT, memory_dir, max_new_tokens=6, show_top=3)
    assert base.new_tokens == baseline.new_tokens
    assert inj.new_tokens == injected.new_tokens
    assert inj.prompt_tokens == injected.prompt_tokens
    assert base.new_tokens != inj.new_tokens
    assert [t.token_id for t in inj.top_next] == [t.token_id for t in injected.top_next]
    assert inj.completion == injected.completion


def test_generate_prints_the_completion_as_plain_text(memory_dir: Path, gpt2_dir: Path) -> None:
    """No table unless asked for: the completion alone, terminal or pipe alike; `-` reads
    the prompt from standard input (one trailing newline dropped)."""
    args = ["generate", "-m", str(memory_dir), "--max-new-tokens", "4"]
    plain = CliRunner().invoke(cli, [*args, PROMPT])
    piped = CliRunner().invoke(cli, [*args, "-"], input=PROMPT + "\n")
    assert plain.exit_code == 0 and piped.exit_code == 0, plain.output + piped.output
    injected = generate(load_model(gpt2_dir), PROMPT, memory_dir, max_new_tokens=4)
    assert plain.stdout == piped.stdout == injected.completion + "\n"
    empty = CliRunner().invoke(cli, [*args, "-"], input="")
    assert empty.exit_code == 2 and "standard input was empty" in empty.stderr


def test_generate_compare_table(memory_dir: Path) -> None:
    result = CliRunner().invoke(
        cli, ["generate", PROMPT, "-m", str(memory_dir), "--compare", "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "injected" in result.output
    assert f"prompt: {PROMPT}" in result.output
    assert "memories: first-president" in result.output
    assert result.output.count("next #") == 5
    shown = CliRunner().invoke(
        cli, ["generate", PROMPT, "-m", str(memory_dir), "--show-top", "2", "--max-new-tokens", "1"]
    )
    assert shown.exit_code == 0 and shown.output.count("next #") == 2, shown.output


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


def test_generate_prompts_file_batches_with_memories_per_line(
    tmp_path: Path, gpt2_dir: Path
) -> None:
    """--prompts: one JSON result per line, each what the Python API gives that prompt
    alone with the memories the line names (absent: the whole set; []: none) and the
    line's own options."""
    write(
        tmp_path / "set.toml",
        f"""version = 1
[model]
name = "{gpt2_dir}"

[[memory]]
name = "washington"
text = "George Washington"
layer = 1
head = 2
tau = 8.0

[[memory]]
name = "rome"
text = "Rome"
layer = 0
site = "resid_pre"
tau = 5.0
""",
    )
    lines = [
        {"id": "all", "prompt": PROMPT},
        {"id": "none", "prompt": PROMPT, "memories": []},
        {"id": "one", "prompt": "Hello there", "memories": ["rome"], "max_new_tokens": 3},
        {"prompt": "A cat", "memories": ["washington"], "show_top": 2, "ignore_eos": True},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--prompts", str(prompts), "-m", str(tmp_path / "set.toml")]
    result = CliRunner().invoke(
        cli, [*args, "--max-new-tokens", "5", "--batch-size", "3", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r.get("id") for r in records] == ["all", "none", "one", None]
    assert [r["memories"] for r in records] == [
        ["washington", "rome"],
        [],
        ["rome"],
        ["washington"],
    ]

    from meminject.loading import load_memories

    model = load_model(gpt2_dir)
    full = load_memories([tmp_path / "set.toml"])
    expected = [
        generate(model, PROMPT, full, max_new_tokens=5),
        generate(model, PROMPT, None, max_new_tokens=5),
        generate(model, "Hello there", full.subset(["rome"]), max_new_tokens=3),
        generate(
            model,
            "A cat",
            full.subset(["washington"]),
            max_new_tokens=5,
            show_top=2,
            stop_at_eos=False,
        ),
    ]
    assert [r["new_tokens"] for r in records] == [g.new_tokens for g in expected]
    assert [r["completion"] for r in records] == [g.completion for g in expected]
    assert records[0]["new_tokens"] != records[1]["new_tokens"]
    assert [t["token_id"] for t in records[3]["top_next"]] == [
        t.token_id for t in expected[3].top_next
    ]
    assert len(records[0]["top_next"]) == 5  # --show-top's default, 5, for every line
    assert records[0]["prompt_tokens"] == expected[0].prompt_tokens
    from meminject.schema import GenerationRecord

    for line in out.read_text(encoding="utf-8").splitlines():
        GenerationRecord.model_validate_json(line)  # the schema of a single prompt's --json

    # --compare: a baseline record before each injected one (none for lines without
    # memories), as for a single prompt.
    compared = CliRunner().invoke(cli, [*args, "--max-new-tokens", "5", "--compare"])
    assert compared.exit_code == 0, compared.output
    rows = [json.loads(x) for x in compared.stdout.splitlines()]
    assert [(r.get("id"), r["memories"]) for r in rows] == [
        ("all", []),
        ("all", ["washington", "rome"]),
        ("none", []),
        ("one", []),
        ("one", ["rome"]),
        (None, []),
        (None, ["washington"]),
    ]
    assert rows[0]["new_tokens"] == records[1]["new_tokens"]  # the baseline is no memories
    assert rows[1]["new_tokens"] == records[0]["new_tokens"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "temprature": 1}', "prompts.jsonl:2: field 'temprature': unknown"),
        ('{"prompt": "a", "memories": ["nope"]}', "prompts.jsonl:2: field 'memories': the -m"),
        ('{"prompt": "a", "top_p": 0}', "prompts.jsonl:2: field 'top_p'"),
        ('["a"]', "prompts.jsonl:2: a line must be a JSON object"),
        ('{"prompt": ', "prompts.jsonl:2: not JSON"),
        ('{"memories": []}', "prompts.jsonl:2: field 'prompt'"),
    ],
)
def test_generate_prompts_file_errors_name_the_line_and_field(
    tmp_path: Path, memory_dir: Path, line: str, message: str
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        cli, ["generate", "--prompts", str(prompts), "-m", str(memory_dir), "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_generate_needs_a_prompt_or_a_prompts_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["generate"])
    assert result.exit_code == 2
    assert "give a PROMPT or --prompts" in result.output


@pytest.mark.parametrize(
    ("table", "bos", "coordinates"),
    [
        ("prepend_bos = false", False, "processed"),
        ('coordinates = "raw"', True, "raw"),
        ('prepend_bos = false\ncoordinates = "raw"', False, "raw"),
    ],
)
def test_a_model_table_means_the_same_in_python_as_on_the_command_line(
    tmp_path: Path, gpt2_dir: Path, table: str, bos: bool, coordinates: str
) -> None:
    """The same file through `meminject generate` and through the Python API gives the
    same prompt tokens and the same completion (issue 24, item 3)."""
    from meminject.errors import MemoryFileError
    from meminject.loading import load_memories

    path = write(
        tmp_path / "set.toml",
        f'version = 1\n[model]\nname = "{gpt2_dir}"\n{table}\n\n[[memory]]\nname = "m"\n'
        'text = "George Washington"\nlayer = 1\ntau = 6.0\n',
    )
    result = CliRunner().invoke(
        cli, ["generate", PROMPT, "-m", str(path), "--json", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    on_the_command_line = json.loads(result.stdout)

    memories = load_memories(path)
    model = load_model(memories=memories)
    assert (model.source, model.prepend_bos, model.coordinates) == (
        str(gpt2_dir),
        bos,
        coordinates,
    )
    in_python = generate(model, PROMPT, memories, max_new_tokens=6)
    assert in_python.prompt_tokens == on_the_command_line["prompt_tokens"]
    assert in_python.new_tokens == on_the_command_line["new_tokens"]
    assert (in_python.prompt_tokens[0] == model.tokenizer.bos_token_id) is bos

    # A model loaded without the set: its BOS follows the set per generation; other
    # coordinates are refused with the way to load, unless chosen explicitly.
    default = load_model(gpt2_dir)
    if coordinates == "processed":
        again = generate(default, PROMPT, memories, max_new_tokens=6)
        assert again.prompt_tokens == in_python.prompt_tokens
        assert again.new_tokens == in_python.new_tokens
    else:
        with pytest.raises(MemoryFileError, match=r"load it with load_model\(\.\.\., memories"):
            generate(default, PROMPT, memories, max_new_tokens=6)
        chosen = load_model(gpt2_dir, coordinates="processed")
        generate(chosen, PROMPT, memories, max_new_tokens=1)  # asked for: runs


def test_chat_prints_the_reply_only(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Issue 29: --chat ran the prompt into the reply; plain output is the reply alone."""
    import shutil

    directory = tmp_path / "llama"
    shutil.copytree(model_dirs["llama"], directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    args = ["generate", "--chat", "--model", str(directory), "--max-new-tokens", "4", "Hi"]
    plain = CliRunner().invoke(cli, args)
    as_json = CliRunner().invoke(cli, [*args, "--json"])
    assert plain.exit_code == 0 and as_json.exit_code == 0, plain.output + as_json.output
    reply = json.loads(as_json.stdout)
    assert reply["prompt"] == "Hi" and len(reply["prompt_tokens"]) > 1  # the template's
    assert plain.stdout == reply["completion"] + "\n"
