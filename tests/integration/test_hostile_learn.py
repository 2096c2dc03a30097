"""Hostile input to ``meminject learn`` (and the CSV reader behind ``sweep``): every case
exits with code 2 and ONE line ``Error: ...`` naming the argument or file, never a
traceback, a hang or exit 1; and a failing command leaves the file system exactly as it
found it (each case that could write compares a snapshot of the folder before and after).

Classes: prompt files that are not regular files (FIFO, directory, device), prompts and
PROMPT/--target longer than the model's context, arguments checked before the model
loads (--name, --alpha, --boundary, --hardness, --grid, --out), --append onto a file it
cannot extend, non-finite learned vectors, a step size that cannot be found (with the
automatic retry with more steps), over-long CSV fields, and the documented command run
verbatim.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import os
import re
import shlex
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from meminject import learn as learning
from meminject.cli import cli
from meminject.default_plugins.datasets import load_csv
from meminject.errors import BadInputError
from meminject.loading import load_memories

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS_PAGE = ROOT / "docs" / "local-memories.md"
PROMPT = "The capital of Vreduthur is"
TARGET = "Shigosmir"


@pytest.fixture(scope="module")
def learned(toyworld) -> learning.LearnedMemory:
    return learning.learn(toyworld, PROMPT, TARGET, layer=2, site="resid_pre", alpha=10.5)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """These arguments must be refused before the model loads: loading it fails the test
    (an unexpected exception exits with 1, not 2)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("meminject.cli.learn.load_cli_model", refuse)


@pytest.fixture
def no_hang() -> Iterator[None]:
    """A read that blocks (a FIFO without a writer) fails the test instead of hanging it."""

    def timeout(signum: int, frame: object) -> None:
        raise TimeoutError("learn blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(folder: Path) -> dict[str, object]:
    """Everything under ``folder``: each path with its bytes (or its kind)."""
    found: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_dir():
            found[key] = "dir"
        elif path.is_file():
            found[key] = path.read_bytes()
        else:
            found[key] = "special"
    return found


def learn_cli(*args: str) -> Result:
    return CliRunner().invoke(cli, ["learn", *args])


def assert_one_line_error(result: Result, expected: str) -> str:
    """Exit 2, one ``Error:`` line on stderr holding ``expected``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.split("\n")
    assert len(lines) == 2 and lines[1] == "", result.stderr
    line = lines[0]
    assert line.startswith("Error: "), line
    assert "Traceback" not in line and "unexpected" not in line, line
    assert expected in line, line
    return line


def base_args(out: Path, *extra: str) -> list[str]:
    return [PROMPT, "--target", TARGET, "--layer", "2", "--site", "resid_pre",
            "--output", str(out), *extra]  # fmt: skip


def prompts_file(path: Path, text: str = f"{PROMPT}\n") -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- 1. prompt files that are not regular files ------------------------------------------


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("option", "make", "kind"),
    [
        ("--positive", _fifo, "a FIFO"),
        ("--negative", _fifo, "a FIFO"),
        ("--positive", _directory, "a directory"),
        ("--negative", lambda _: Path(os.devnull), "a device"),
    ],
    ids=["fifo-positive", "fifo-negative", "directory-positive", "device-negative"],
)
def test_prompt_file_that_is_not_a_regular_file_is_refused_without_reading_it(
    tmp_path, no_model, no_hang, option, make, kind
):
    source = make(tmp_path / "prompts")
    before = snapshot(tmp_path)
    result = learn_cli(*base_args(tmp_path / "out.toml", option, str(source)))
    assert_one_line_error(result, f"Error: {source}: not a regular file ({kind})")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"# only a comment\n\n   \n", "holds no prompts"),
        (b"The capital of \xff is\n", "not UTF-8 text (invalid start byte at byte 15)"),
        (
            b"x" * (learning.MAX_PROMPT_FILE_BYTES + 1),
            f"file is {learning.MAX_PROMPT_FILE_BYTES + 1} bytes, over the "
            f"{learning.MAX_PROMPT_FILE_BYTES}-byte limit for prompt files",
        ),
    ],
    ids=["no-prompts", "not-utf8", "too-large"],
)
def test_unusable_prompt_file_names_the_file(tmp_path, no_model, content, expected):
    source = tmp_path / "neg.txt"
    source.write_bytes(content)
    before = snapshot(tmp_path)
    result = learn_cli(*base_args(tmp_path / "out.toml", "--negative", str(source)))
    assert_one_line_error(result, f"Error: {source}: {expected}")
    assert snapshot(tmp_path) == before


def test_missing_prompt_file(tmp_path, no_model):
    result = learn_cli(*base_args(tmp_path / "out.toml", "--positive", str(tmp_path / "no.txt")))
    assert_one_line_error(result, f"Error: {tmp_path / 'no.txt'}: no such file")
    assert snapshot(tmp_path) == {}


# --- 2. prompts longer than the model's context ------------------------------------------


def long_prompt(model, tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens (BOS included) on this model."""
    prompt = "the" + " the" * (tokens - 2)
    assert len(model.tokenize(prompt)) == tokens
    return prompt


@pytest.mark.parametrize("option", ["--positive", "--negative"])
def test_prompt_longer_than_the_context_names_its_file_and_line(toyworld, tmp_path, option):
    n_ctx = toyworld.dims.n_ctx
    source = prompts_file(
        tmp_path / "prompts.txt",
        f"# paraphrases\n{PROMPT}\n{long_prompt(toyworld, n_ctx + 5)}\n",
    )
    before = snapshot(tmp_path)
    result = learn_cli(*base_args(tmp_path / "out.toml", option, str(source)))
    assert_one_line_error(
        result,
        f"Error: {source}:3: the prompt is {n_ctx + 5} tokens, longer than the model's "
        f"context of {n_ctx} tokens",
    )
    assert "alpha =" not in result.stdout  # refused before learning
    assert snapshot(tmp_path) == before


def test_learning_prompt_longer_than_the_context(toyworld, tmp_path):
    n_ctx = toyworld.dims.n_ctx
    result = learn_cli(
        long_prompt(toyworld, n_ctx + 1), "--target", TARGET, "--layer", "1", "--site",
        "resid_pre", "--output", str(tmp_path / "out.toml"),
    )  # fmt: skip
    assert_one_line_error(
        result,
        f"Error: PROMPT: the prompt is {n_ctx + 1} tokens, longer than the model's context "
        f"of {n_ctx} tokens",
    )
    assert snapshot(tmp_path) == {}


def test_prompt_and_teacher_forced_target_longer_than_the_context(toyworld, tmp_path):
    n_ctx = toyworld.dims.n_ctx
    target = " Shigosmir Geindor Vreduthur"
    extra = len(learning.target_tokens(toyworld, target)) - 1
    assert extra >= 2
    result = learn_cli(
        long_prompt(toyworld, n_ctx), "--target", target, "--teacher-force", "--layer", "1",
        "--site", "resid_pre", "--output", str(tmp_path / "out.toml"),
    )  # fmt: skip
    assert_one_line_error(
        result,
        f"Error: PROMPT: the prompt ({n_ctx} tokens) and the {extra} target tokens that "
        f"--teacher-force feeds back are {n_ctx + extra} tokens, longer than the model's "
        f"context of {n_ctx} tokens",
    )
    assert snapshot(tmp_path) == {}


# --- 3. every argument is checked before the model loads ---------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--name", "../../x"], "--name '../../x' is not a valid memory name"),
        (["--name", "sub/x"], "--name 'sub/x' is not a valid memory name"),
        (["--name", ""], "--name '' is not a valid memory name"),
        (["--name", "a\nb"], "--name 'a\\nb' is not a valid memory name"),
        (["--name", "n" * 129], "at most 128 characters"),
        (["--boundary", "inf"], "--boundary must be a finite number above 0, got inf"),
        (["--boundary", "nan"], "--boundary must be a finite number above 0, got nan"),
        (["--boundary", "0"], "--boundary must be a finite number above 0, got 0.0"),
        (["--hardness", "inf"], "--hardness must be a finite number above 0, got inf"),
        (["--hardness", "-3"], "--hardness must be a finite number above 0, got -3.0"),
        (["--alpha", "inf"], "--alpha must be a finite number above 0, got inf"),
        (["--alpha", "nan"], "--alpha must be a finite number above 0, got nan"),
        (["--alpha", "-1"], "--alpha must be a finite number above 0, got -1.0"),
        (["--grid", "0-1:0.5"], "every boundary of the grid must be a finite number above 0"),
        (["--grid", "0.1,inf"], "cannot read grid spec item 'inf' in '0.1,inf'"),
        (["--append", "--force"], "pass --append or --force, not both"),
    ],
    ids=[
        "name-escapes", "name-slash", "name-empty", "name-newline", "name-too-long",
        "boundary-inf", "boundary-nan", "boundary-zero", "hardness-inf", "hardness-negative",
        "alpha-inf", "alpha-nan", "alpha-negative", "grid-zero", "grid-inf", "append-and-force",
    ],
)  # fmt: skip
def test_bad_argument_is_refused_before_the_model_loads_and_writes_nothing(
    tmp_path, no_model, extra, expected
):
    out = tmp_path / "out" / "sub" / "m.toml"
    result = learn_cli(*base_args(out, *extra))
    assert_one_line_error(result, expected)
    assert snapshot(tmp_path) == {}  # not even out/ was made, nor ../../x.*.safetensors


def _existing_dir(tmp_path: Path) -> Path:
    (tmp_path / "d.toml").mkdir()
    return tmp_path / "d.toml"


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file.txt").write_text("not a folder")
    return tmp_path / "file.txt" / "m.toml"


def _existing_file(tmp_path: Path) -> Path:
    (tmp_path / "m.toml").write_text("version = 1\n")
    return tmp_path / "m.toml"


def _fifo_out(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "m.toml")
    return tmp_path / "m.toml"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_existing_dir, "{out}: not a regular file (a directory)"),
        (_fifo_out, "{out}: not a regular file (a FIFO)"),
        (_under_a_file, "{out}: cannot write the output here: Not a directory"),
        (_existing_file, "{out} exists; pass --force to overwrite it or --append to add"),
        (lambda d: d / "m.json", "{out}: the output must be a .toml file"),
    ],
    ids=["directory", "fifo", "under-a-file", "exists", "not-toml"],
)
def test_bad_out_path_is_refused_before_the_model_loads(
    tmp_path, no_model, no_hang, make, expected
):
    out = make(tmp_path)
    before = snapshot(tmp_path)
    result = learn_cli(*base_args(out))
    assert_one_line_error(result, "Error: " + expected.format(out=out))
    assert snapshot(tmp_path) == before


# --- 4. --append onto a file it cannot extend; failures after the checks -----------------

INLINE = 'version = 1\nmemory = [{name = "a", text = "Paris", layer = 1, tau = 2.0}]\n'


def test_append_onto_inline_memory_array_is_refused_naming_the_real_file(tmp_path, no_model):
    out = tmp_path / "inline.toml"
    out.write_text(INLINE)
    assert len(load_memories([out])) == 1  # a valid file
    before = snapshot(tmp_path)
    result = learn_cli(*base_args(out, "--append", "--boundary", "0.3"))
    line = assert_one_line_error(result, f"Error: {out}: its memories are an inline array")
    assert ".check.toml" not in line
    assert snapshot(tmp_path) == before


def test_append_with_a_taken_name_is_refused_before_the_model_loads(tmp_path, no_model):
    out = tmp_path / "m.toml"
    out.write_text(
        'version = 1\n[[memory]]\nname = "taken"\ntext = "Paris"\nlayer = 1\ntau = 2.0\n'
    )
    before = snapshot(tmp_path)
    result = learn_cli(*base_args(out, "--append", "--name", "taken"))
    assert_one_line_error(result, f"Error: {out} already has a memory named 'taken'")
    assert snapshot(tmp_path) == before


def test_append_onto_another_models_file_is_refused_before_learning(toyworld, tmp_path):
    out = tmp_path / "m.toml"
    out.write_text(
        'version = 1\n[model]\nfingerprint = "blake2b:0000"\n'
        '[[memory]]\nname = "a"\ntext = "Paris"\nlayer = 1\ntau = 2.0\n'
    )
    before = snapshot(tmp_path)
    result = learn_cli(*base_args(out, "--append"))
    assert_one_line_error(result, f"Error: {out} holds memories for another model")
    assert "alpha =" not in result.stdout
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"boundary": float("inf")}, "boundary must be a finite number above 0, got inf"),
        ({"hardness": float("nan")}, "hardness must be a finite number above 0, got nan"),
        ({"name": "../x"}, "the memory name '../x' is not a valid memory name"),
    ],
    ids=["boundary-inf", "hardness-nan", "name-escapes"],
)
def test_write_learned_checks_its_arguments_before_writing(
    toyworld, learned, tmp_path, changes, expected
):
    kwargs = {"name": "edit", "boundary": 0.3, "hardness": 3.0, **changes}
    with pytest.raises(BadInputError, match=re.escape(expected)):
        learning.write_learned(tmp_path / "out" / "edit.toml", learned, toyworld, **kwargs)
    assert snapshot(tmp_path) == {}  # no orphan tensor file, no folder


def test_invalid_new_file_is_caught_before_any_write_and_names_the_real_file(
    toyworld, learned, tmp_path
):
    out = tmp_path / "edit.toml"
    broken = dataclasses.replace(learned, layer=-1)  # what the schema refuses
    with pytest.raises(BadInputError) as caught:
        learning.write_learned(out, broken, toyworld, name="edit", boundary=0.3, hardness=3.0)
    message = str(caught.value)
    assert message.startswith(f"{out}: writing memory 'edit' would make an invalid file")
    assert "nothing was written" in message and ".check" not in message
    assert snapshot(tmp_path) == {}


def test_failed_toml_write_removes_the_tensor_file_and_made_folders(
    toyworld, learned, tmp_path, monkeypatch
):
    out = tmp_path / "new" / "edit.toml"

    def full_disk(path: object, text: str, *, overwrite: bool = False) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("meminject.atomic.write_text_atomic", full_disk)
    with pytest.raises(BadInputError, match=r"cannot write: No space left on device"):
        learning.write_learned(out, learned, toyworld, name="edit", boundary=0.3, hardness=3.0)
    assert snapshot(tmp_path) == {}


def test_failed_append_keeps_the_old_pair(toyworld, learned, tmp_path, monkeypatch):
    out = tmp_path / "edit.toml"
    learning.write_learned(out, learned, toyworld, name="edit", boundary=0.3, hardness=3.0)
    before = snapshot(tmp_path)
    monkeypatch.setattr(
        "meminject.atomic.write_text_atomic",
        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO))),
    )
    moved = dataclasses.replace(learned, prompt="The capital city of Vreduthur is")
    with pytest.raises(BadInputError, match="cannot write: Input/output error"):
        learning.write_learned(
            out, moved, toyworld, name="edit-2", boundary=0.3, hardness=3.0, append=True
        )
    assert snapshot(tmp_path) == before


# --- 5. non-finite learned vectors ---------------------------------------------------------


def test_alpha_that_overflows_the_delta_is_refused(toyworld, tmp_path):
    result = learn_cli(*base_args(tmp_path / "out.toml", "--alpha", "1e300"))
    assert_one_line_error(
        result,
        "Error: the learned delta (alpha = 1e+300, 1 step) is not finite (inf or nan); use a "
        "smaller --alpha",
    )
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize(
    ("field", "value"), [("delta", float("nan")), ("delta", float("inf")), ("key", float("-inf"))]
)
def test_write_refuses_non_finite_tensors(toyworld, learned, tmp_path, field, value):
    tensor = getattr(learned, field).clone()
    tensor[3] = value
    bad = dataclasses.replace(learned, **{field: tensor})
    with pytest.raises(BadInputError, match=rf"the learned {field} is not finite"):
        learning.write_learned(
            tmp_path / "m.toml", bad, toyworld, name="m", boundary=0.3, hardness=3.0
        )
    assert snapshot(tmp_path) == {}


def test_delta_that_overflows_the_models_dtype_is_refused():
    big = torch.full((4,), 1e6)  # finite in float32, inf in float16
    learning.check_finite(big, "delta", torch.float32)
    with pytest.raises(BadInputError, match=r"the learned delta overflows float16 \(largest"):
        learning.check_finite(big, "delta", torch.float16)


# --- 6. no step size reaches top-1 -------------------------------------------------------

HARD = ["the capital of", "--target", "Shigosmir", "--layer", "1", "--site", "attn_out"]


def test_one_step_failure_says_what_to_try(toyworld, tmp_path):
    result = learn_cli(*HARD, "--steps", "1", "--output", str(tmp_path / "X.toml"))
    assert_one_line_error(
        result,
        "makes the target top-1 by a margin of 0.5 nats with 1 step at site 'attn_out' of "
        "layer 1; try more --steps (e.g. --steps 2), a smaller --margin, another --layer or "
        "another --site",
    )
    assert snapshot(tmp_path) == {}


def test_default_steps_retry_with_more_steps_and_report_them(toyworld, tmp_path):
    out = tmp_path / "X.toml"
    result = learn_cli(*HARD, "--output", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("alpha = ")
    first = next(line for line in result.stdout.splitlines() if "with the written file" in line)
    assert "(3 steps; 1 step did not reach the margin" in first
    assert "steps = 3;" in out.read_text()
    assert len(load_memories([out])) == 1


def test_retry_gives_up_after_the_last_step_count(toyworld):
    with pytest.raises(BadInputError) as caught:
        learning.learn(
            toyworld, "the capital of", "Shigosmir", layer=0, site="attn_z",
            steps=1, max_steps=3, max_doublings=3,
        )  # fmt: skip
    message = str(caught.value)
    assert (
        "makes the target top-1 by a margin of 0.5 nats with 1 to 3 steps at site 'attn_z' of "
        "layer 0" in message
    )
    assert (
        "try more --steps (e.g. --steps 6), a smaller --margin, another --layer or another "
        "--site" in message
    )


# --- 7. CSV fields over the csv module's limit -------------------------------------------


@pytest.mark.parametrize(
    ("layout", "line", "row"),
    [("header", 1, "the header"), ("first", 2, "data row 1"), ("third", 4, "data row 3")],
)
def test_csv_field_over_the_limit_names_file_and_row(tmp_path, layout, line, row):
    huge = "x" * (csv.field_size_limit() + 1)
    header = "obscure_sentence,explicit_entity,answer\n"
    good = "The capital of Norway lies in,Oslo,Europe\n"
    text = {
        "header": f"{huge},explicit_entity,answer\n{good}",
        "first": f"{header}{huge},Oslo,Europe\n",
        "third": f"{header}{good}{good}{huge},Oslo,Europe\n",
    }[layout]
    path = tmp_path / "d.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BadInputError) as caught:
        load_csv(path)
    assert str(caught.value) == (
        f"{path}:{line}: {row}: a field is longer than {csv.field_size_limit()} characters, "
        "the most a field may hold"
    )


def test_sweep_with_an_over_long_csv_field_is_one_error(tmp_path):
    path = tmp_path / "d.csv"
    huge = "x" * (csv.field_size_limit() + 1)
    path.write_text(f"obscure_sentence,explicit_entity,answer\n{huge},Oslo,Europe\n")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, ["sweep", str(path), "--output", str(tmp_path / "r.csv")])
    assert_one_line_error(result, f"Error: {path}:2: data row 1: a field is longer than")
    assert snapshot(tmp_path) == before


# --- 8. the documented command runs verbatim ---------------------------------------------


def _doc_blocks(text: str) -> list[str]:
    return re.findall(r"^```[\w-]*\n(.*?)\n```$", text, re.DOTALL | re.MULTILINE)


def test_documented_learn_command_runs_verbatim(toyworld, tmp_path, monkeypatch):
    text = DOCS_PAGE.read_text(encoding="utf-8")
    blocks = _doc_blocks(text)
    console = next(b for b in blocks if b.startswith("$ meminject learn "))
    command = console[2:].split("\nalpha = ")[0]  # the command, before what it printed
    args = shlex.split(command.replace("\\\n", " "))
    assert args[:2] == ["meminject", "learn"]
    printed = next(b for b in blocks if b.startswith("alpha = "))
    # A copy of the repository's memories folder as the working directory: the command's
    # relative paths resolve as in a checkout, and the checkout is never written to.
    shutil.copytree(ROOT / "memories", tmp_path / "memories")
    monkeypatch.chdir(tmp_path)
    out = Path(args[args.index("--output") + 1])
    assert not out.exists()
    result = CliRunner().invoke(cli, args[1:])
    assert result.exit_code == 0, result.output

    def normal(output: str) -> list[str]:
        hashed = re.sub(r"\.[0-9a-f]{10}\.safetensors", ".HASH.safetensors", output)
        return [line.rstrip() for line in hashed.strip("\n").splitlines()]

    assert normal(result.stdout) == normal(printed)
    memory = load_memories([out]).entries[0]
    assert memory.name == "vreduthur-capital" and memory.memory.boundary == 0.325
