"""Hostile files and names: every one is refused with exit code 2 and ONE line
``Error: FILE:LINE: memory 'NAME': field 'PATH': message`` - never a traceback, never
"unexpected ...", never a hang.

Classes: nesting and dotted-key depth (checked before tomllib / json run), file-system
names (symbolic link loops, names too long, NUL bytes, FIFOs, unreadable folders, broken
links, the empty path), strict ``version``, control characters in names (escaped where
errors are formatted), unbounded echoed values (cut), ``validate --all-problems``, and
tensor files (float8 dtypes, values that overflow when cast, bad tensor paths, deep JSON
headers). The tensor cases that need a model run through ``validate --model`` and are
marked ``integration``; the same cases run without a model through ``read_tensors``.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from meminject.cli import cli
from meminject.errors import MAX_ECHO, MemoryFileError, echo, one_line, shorten
from meminject.loading import load_memories
from meminject.memfile import MAX_KEY_PARTS, MAX_NESTING, structure_problem

OK = 'version = 1\n[[memory]]\nname = "m"\ntext = "Paris"\nlayer = 1\ntau = 2.0\n'
GATED = (
    'version = 1\n[[memory]]\nname = "g"\nstrategy = "gated"\nsite = "resid_post"\nlayer = 0\n'
    'tensors = "g.safetensors"\nboundary = 0.5\nhardness = 3.0\n'
)
NAME_MAX = os.pathconf("/", "PC_NAME_MAX")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["validate", *args])


def assert_one_line_error(result: Result, expected: str) -> str:
    """Exit 2, nothing on stdout, one ``Error:`` line on stderr holding ``expected``."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.split("\n")
    assert len(lines) == 2 and lines[1] == "", result.stderr[:2000]
    line = lines[0]
    assert line.startswith("Error: ")
    assert "Traceback" not in line and "unexpected" not in line
    assert expected in line, line[:2000]
    # Nothing that ends or rewrites a line on a terminal survives.
    for char in "\r\x0b\x0c\x1b\x85\x9b\u2028\u2029\u202e":
        assert char not in line
    return line


def write(d: Path, text: str, name: str = "m.toml") -> Path:
    path = d / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------
# The table: each builder gets an empty folder and returns the command-line paths; the
# expected text may use {f} (the first path) and {d} (the folder).

Build = Callable[[Path], list[str]]


def text_case(text: str) -> Build:
    return lambda d: [str(write(d, text))]


def symlink_loop_file(d: Path) -> list[str]:
    (d / "loop.toml").symlink_to(d / "loop.toml")
    return [str(d / "loop.toml")]


def two_link_loop(d: Path) -> list[str]:
    (d / "a.toml").symlink_to(d / "b.toml")
    (d / "b.toml").symlink_to(d / "a.toml")
    return [str(d / "a.toml")]


def symlink_loop_in_dir(d: Path) -> list[str]:
    write(d, OK, "ok.toml")
    (d / "l.toml").symlink_to(d / "l.toml")
    return [str(d)]


def loop_not_named_toml_in_dir(d: Path) -> list[str]:
    write(d, OK, "ok.toml")
    (d / "sub").symlink_to(d / "sub")
    return [str(d)]


def broken_symlink_subfolder(d: Path) -> list[str]:
    write(d, OK, "ok.toml")
    (d / "more").symlink_to(d / "gone")
    return [str(d)]


def name_too_long(d: Path) -> list[str]:
    return [str(d / ("x" * (NAME_MAX + 1) + ".toml"))]


def path_too_long(d: Path) -> list[str]:
    return [str(d / "/".join(["y" * 200] * 30) / "m.toml")]


def name_too_long_in_dir_argument(d: Path) -> list[str]:
    return [str(d / ("z" * (NAME_MAX + 1)))]


def fifo_file(d: Path) -> list[str]:
    os.mkfifo(d / "pipe.toml")
    return [str(d / "pipe.toml")]


def fifo_in_dir(d: Path) -> list[str]:
    write(d, OK, "ok.toml")
    os.mkfifo(d / "pipe.toml")
    return [str(d)]


def file_as_folder(d: Path) -> list[str]:
    write(d, OK)
    return [str(d / "m.toml" / "inner.toml")]


def control_chars_in_file_name(d: Path) -> list[str]:
    return [str(write(d, "version = \n", "a\x1b[2Jb\x0bc\u2028d.toml"))]


CASES: list[tuple[str, Build, str]] = [
    # class 1: nesting and dotted keys, refused before tomllib runs
    (
        "nested-arrays",
        text_case("x = " + "[" * 5000 + "]" * 5000 + "\n"),
        f"Error: {{f}}:1: invalid TOML: arrays and inline tables nest deeper than {MAX_NESTING} "
        "levels",
    ),
    (
        "nested-inline-tables",
        text_case("x = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n"),
        f"Error: {{f}}:1: invalid TOML: arrays and inline tables nest deeper than {MAX_NESTING} "
        "levels",
    ),
    (
        "nested-positions-in-a-memory",
        text_case(OK + "positions = " + "[" * 200 + "1" + "]" * 200 + "\n"),
        "Error: {f}:7: invalid TOML: arrays and inline tables nest deeper than",
    ),
    (
        "dotted-key-40000-parts",
        text_case("a." * 40_000 + "a = 1\n"),
        f"Error: {{f}}:1: invalid TOML: a dotted key has more than {MAX_KEY_PARTS} parts",
    ),
    (
        "dotted-table-header",
        text_case(OK + "[" + "t." * 5000 + "t]\nx = 1\n"),
        f"Error: {{f}}:7: invalid TOML: a dotted key has more than {MAX_KEY_PARTS} parts",
    ),
    (
        "dotted-key-in-inline-table",
        text_case("x = {" + "k." * 500 + "k = 1}\n"),
        "Error: {f}:1: invalid TOML: a dotted key has more than",
    ),
    # class 5: version is the integer 1, not something equal to it
    (
        "version-true",
        text_case(OK.replace("version = 1", "version = true")),
        "Error: {f}:1: field 'version': version must be the integer 1, not a boolean (true)",
    ),
    (
        "version-float",
        text_case(OK.replace("version = 1", "version = 1.0")),
        "Error: {f}:1: field 'version': version must be the integer 1, not a float (1.0)",
    ),
    # class 6: control characters in keys and file names are escaped
    (
        "vertical-tab-and-form-feed-in-key",
        text_case(OK + '"a\\u000bb\\u000cc" = 1\n'),
        "Error: {f}:2: memory 'm': field 'a\\x0bb\\x0cc': unknown key 'a\\x0bb\\x0cc'",
    ),
    (
        "nel-in-key",
        text_case(OK + '"a\\u0085b" = 1\n'),
        "Error: {f}:2: memory 'm': field 'a\\x85b': unknown key 'a\\x85b'",
    ),
    (
        "line-and-paragraph-separators-in-key",
        text_case(OK + '"a\\u2028b\\u2029c" = 1\n'),
        "Error: {f}:2: memory 'm': field 'a\\u2028b\\u2029c': unknown key 'a\\u2028b\\u2029c'",
    ),
    (
        "ansi-escape-forging-a-line",
        text_case(OK + '"x\\u001b[2K\\u001b[1GError: all good" = 1\n'),
        "unknown key 'x\\x1b[2K\\x1b[1GError: all good'",
    ),
    (
        "other-c0-c1-and-bidi-in-key",
        text_case(OK + '"\\u0007\\u009b\\u202e\\u0000" = 1\n'),
        "unknown key '\\x07\\x9b\\u202e\\x00'",
    ),
    ("control-chars-in-file-name", control_chars_in_file_name, "a\\x1b[2Jb\\x0bc\\u2028d.toml:1"),
    # class 7: echoed values are cut
    (
        "900kb-value-echoed",
        text_case(OK.replace("tau = 2.0", 'tau = "' + "v" * 900_000 + '"')),
        "field 'tau': Input should be a valid number, got '" + "v" * MAX_ECHO + "'… "
        "(900000 characters)",
    ),
    (
        "long-unknown-key",
        text_case(OK + '"' + "k" * 300_000 + '" = 1\n'),
        "unknown key '" + "k" * MAX_ECHO + "… (300000 characters)'",
    ),
    (
        "long-value-not-a-table",
        text_case('version = 1\nmemory = ["' + "t" * 50_000 + '"]\n'),
        "memory #1: must be a table, got '" + "t" * MAX_ECHO + "'… (50000 characters)",
    ),
    # class 2: file-system names
    ("symlink-loop-file", symlink_loop_file, "Error: {f}: cannot read: symbolic link loop"),
    ("two-link-loop", two_link_loop, "Error: {f}: cannot read: symbolic link loop"),
    (
        "symlink-loop-in-directory",
        symlink_loop_in_dir,
        "Error: {d}/l.toml: cannot read: symbolic link loop",
    ),
    (
        "symlink-loop-not-named-toml-in-directory",
        loop_not_named_toml_in_dir,
        "Error: {d}/sub: cannot read: symbolic link loop",
    ),
    (
        "broken-symlink-subfolder",
        broken_symlink_subfolder,
        "Error: {d}/more: cannot read: broken symbolic link (its target does not exist)",
    ),
    ("file-name-too-long", name_too_long, ": cannot read: name is too long for the file system"),
    ("path-too-long", path_too_long, ": cannot read: name is too long for the file system"),
    (
        "directory-name-too-long",
        name_too_long_in_dir_argument,
        ": cannot read: name is too long for the file system",
    ),
    (
        "nul-byte-in-path",
        lambda d: [str(d / "a\x00b.toml")],
        "a\\x00b.toml: cannot read: name contains a NUL byte",
    ),
    (
        "empty-path-argument",
        lambda d: [""],
        "Error: empty path (an unset shell variable?); name a memory file or directory",
    ),
    ("fifo-file", fifo_file, "Error: {f}: not a regular file"),
    ("fifo-in-directory", fifo_in_dir, "Error: {d}/pipe.toml: not a regular file"),
    ("file-used-as-folder", file_as_folder, "Error: {f}: cannot read: Not a directory"),
]


@pytest.mark.parametrize(("name", "build", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hostile_file(tmp_path: Path, name: str, build: Build, expected: str) -> None:
    d = tmp_path / "set"
    d.mkdir()
    paths = build(d)
    start = time.monotonic()
    result = invoke(*paths)
    assert time.monotonic() - start < 10  # no hang, no quadratic blow-up
    shown = one_line(paths[0]) if paths[0] else ""
    line = assert_one_line_error(result, expected.format(f=shown, d=d))
    assert len(line) < 2 * MAX_ECHO + 1500


def test_table_size() -> None:
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


def test_dotted_key_is_refused_quickly(tmp_path: Path) -> None:
    path = write(tmp_path, "a." * 40_000 + "a = 1\n")
    start = time.monotonic()
    assert_one_line_error(invoke(str(path)), "a dotted key has more than")
    assert time.monotonic() - start < 2


def test_loader_raises_its_own_error_for_deep_nesting(tmp_path: Path) -> None:
    path = write(tmp_path, "x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(MemoryFileError, match="nest deeper than"):
        load_memories([path])


@pytest.mark.parametrize(
    "text",
    [
        # brackets, braces and dots inside strings and comments are not structure
        OK.replace('"Paris"', '"' + "[{." * 3000 + '"'),
        OK.replace('"Paris"', "'" + "[." * 3000 + "'"),
        OK.replace('"Paris"', '"""\n' + "[." * 3000 + '\n"""'),
        OK.replace('"Paris"', "'''\n" + "{." * 3000 + "\n'''"),
        OK.replace('"Paris"', '"a\\"' + "[" * 3000 + '"'),
        OK.replace('"Paris"', '"""a""' + "[" * 3000 + '"""""'),
        OK + "# " + "[." * 3000 + "\n",
        OK.replace("[[memory]]", "[[memory]]  # [[[[" + "." * 100),
        # legitimate depth and many separate dots
        OK + "positions = [" + ", ".join(str(i) for i in range(100)) + "]\n",
        "version = 1\n"
        + "".join(OK.split("\n", 1)[1].replace('"m"', f'"m{i}"') for i in range(100)),
    ],
    ids=[
        "basic",
        "literal",
        "multiline-basic",
        "multiline-literal",
        "escaped-quote",
        "quotes-before-close",
        "comment",
        "header-comment",
        "long-list",
        "many-memories",
    ],
)
def test_no_false_alarm(tmp_path: Path, text: str) -> None:
    assert structure_problem(text) is None
    result = invoke(str(write(tmp_path, text)))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ")


def test_limits_are_exact() -> None:
    assert structure_problem("x = " + "[" * MAX_NESTING + "]" * MAX_NESTING) is None
    deeper = "x = " + "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    assert structure_problem(deeper) == (
        f"arrays and inline tables nest deeper than {MAX_NESTING} levels",
        1,
    )
    assert structure_problem(".".join(["a"] * MAX_KEY_PARTS) + " = 1") is None
    assert structure_problem(".".join(["a"] * (MAX_KEY_PARTS + 1)) + " = 1") is not None
    assert structure_problem("[" * 65 + "]" * 65, toml=False) is not None
    assert structure_problem('{"a": "' + "[" * 100 + '"}', toml=False) is None


# ----------------------------------------------------------------------------------------
# Class 8: folders that cannot be read are errors, not silently skipped


def test_unreadable_subfolder_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, where chmod 000 does not stop reading: the listing's refusal is
    # simulated here, and produced for real (as another user) in the next test.
    write(tmp_path, OK, "ok.toml")
    locked = tmp_path / "locked"
    locked.mkdir()
    write(locked, OK.replace('"m"', '"hidden-away"'), "x.toml")
    real_scandir = os.scandir

    def scandir(path: os.PathLike[str] | str) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert_one_line_error(
        invoke(str(tmp_path)), f"Error: {locked}: cannot read directory: Permission denied"
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_unreadable_subfolder_for_real() -> None:
    """chmod 000 for real; as root, a forked child drops to 'nobody' first."""
    root = Path(tempfile.mkdtemp(prefix="meminject-unreadable-"))
    try:
        root.chmod(0o755)
        write(root, OK, "ok.toml").chmod(0o644)
        locked = root / "locked"
        locked.mkdir()
        write(locked, OK.replace('"m"', '"n"'), "x.toml")
        locked.chmod(0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 3
            try:
                os.close(read_end)
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                result = invoke(str(root))
                os.write(write_end, f"{result.exit_code}\n{result.stderr}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            out = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, out
        exit_code, stderr = out.split("\n", 1)
        assert exit_code == "2"
        assert stderr == f"Error: {locked}: cannot read directory: Permission denied\n"
    finally:
        (root / "locked").chmod(0o755)
        for path in sorted(root.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        root.rmdir()


def test_empty_path_among_good_ones(tmp_path: Path) -> None:
    good = write(tmp_path, OK)
    assert_one_line_error(invoke(str(good), ""), "Error: empty path (an unset shell variable?)")


def test_symlinked_folder_is_still_not_followed(tmp_path: Path) -> None:
    # As before (Path.rglob): a link to a folder is not followed, so a link to the folder
    # itself is no loop.
    write(tmp_path, OK)
    (tmp_path / "self").symlink_to(tmp_path)
    result = invoke(str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: 1 memory in 1 file (schema)\n"


# ----------------------------------------------------------------------------------------
# Class 9: --all-problems


def test_all_problems_lists_every_problem(tmp_path: Path) -> None:
    bad = write(tmp_path, OK.replace("tau =", "taux =") + 'positions = "first"\n', "a.toml")
    broken = write(tmp_path, "version = \n", "b.toml")
    first = invoke(str(bad))
    assert_one_line_error(first, "(and 3 more problems)")
    result = invoke("--all-problems", "", str(bad), str(broken))
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines == [
        "Error: empty path (an unset shell variable?); name a memory file or directory",
        f"Error: {bad}:6: memory 'm': field 'taux': unknown key 'taux'; did you mean 'tau'?",
        f"Error: {bad}:7: memory 'm': field 'positions': Input should be 'all', 'prompt', "
        "'generated' or 'last', got 'first'",
        f"Error: {bad}:7: memory 'm': field 'positions': Input should be a valid list, got 'first'",
        f"Error: {bad}:2: memory 'm': field 'tau': required field is missing",
        f"Error: {broken}:1: invalid TOML: Invalid value",
    ]
    assert "Traceback" not in result.output


def test_all_problems_across_files(tmp_path: Path) -> None:
    body = OK.split("\n", 1)[1]  # one [[memory]] table named "m"
    a = write(tmp_path, OK + body, "a.toml")  # "m" twice in one file
    b = write(tmp_path, OK, "b.toml")  # and once more in another
    c = write(tmp_path, 'version = 1\n[model]\nname = "x"\n' + body.replace('"m"', '"c"'), "c.toml")
    d = write(tmp_path, 'version = 1\n[model]\nname = "y"\n' + body.replace('"m"', '"d"'), "d.toml")
    result = invoke("--all-problems", str(a), str(b), str(c), str(d))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"Error: {a}:8: memory 'm': field 'name': duplicate memory name, already used by "
        f"memory #1 of {a}",
        f"Error: {b}:3: memory 'm': field 'name': duplicate memory name, already used by "
        f"memory #1 of {a}",
        f"Error: {d}:3: field 'model.name': [model] name = 'y' disagrees with 'x' in {c}",
    ]


def test_many_problems_stay_linear_and_bounded(tmp_path: Path) -> None:
    from meminject.memfile import MAX_PROBLEMS_PER_FILE

    path = write(tmp_path, "version = 1\n" + "[[memory]]\nx = 1\n" * 20_000)
    start = time.monotonic()
    assert_one_line_error(invoke(str(path)), "(and 99999 more problems)")
    result = invoke("--all-problems", str(path))
    assert time.monotonic() - start < 30
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == MAX_PROBLEMS_PER_FILE + 1
    assert lines[-2] == f"Error: {path}:2001: memory #1000: field 'x': unknown key 'x'"
    assert lines[-1] == f"Error: {path}: (and 99000 more problems, not listed)"


def test_all_problems_on_good_files_is_ok(tmp_path: Path) -> None:
    result = invoke("--all-problems", str(write(tmp_path, OK)))
    assert result.exit_code == 0
    assert result.stdout == "ok: 1 memory in 1 file (schema)\n"


# ----------------------------------------------------------------------------------------
# The central formatting


def test_one_line_escapes_every_control_character() -> None:
    controls = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]
    controls += ["\u2028", "\u2029", "\u202a", "\u202e", "\u2066", "\u2069", "\u200f", "\ufeff"]
    text = one_line("".join(controls))
    assert text.isprintable() and "\\" in text
    assert all(char not in text for char in controls)
    assert one_line("a\nb\rc\td\x0be\u2028") == "a\\nb\\rc\\td\\x0be\\u2028"
    assert one_line("tau = 2.0 ok, 'm' é τ") == "tau = 2.0 ok, 'm' é τ"  # printable stays


def test_every_meminject_error_is_one_line() -> None:
    from meminject.errors import BadInputError, PluginError

    assert str(BadInputError("bad\nflag\x1b[31m")) == "bad\\nflag\\x1b[31m"
    assert "\u2028" not in str(PluginError("p\u2028q", "broke"))
    long = str(BadInputError("x" * 100_000 + "\n"))
    assert len(long) <= 4000 and "characters cut" in long and long.endswith("x\\n")
    assert one_line(long) == long  # formatting twice changes nothing


def test_echo_and_shorten_bound_values() -> None:
    assert echo("abc") == "'abc'"
    assert echo("v" * 1000) == repr("v" * MAX_ECHO) + "… (1000 characters)"
    assert echo(list(range(10_000))).endswith("characters)")
    assert len(echo(list(range(10_000)))) < MAX_ECHO + 40
    assert shorten("k" * 10) == "k" * 10
    assert shorten("k" * 500) == "k" * MAX_ECHO + "… (500 characters)"


# ----------------------------------------------------------------------------------------
# Tensor files: the same checks without a model (read_tensors) and through
# ``validate --model`` (integration: needs the tiny GPT-2).


def _tensors(kind: str) -> dict[str, object] | bytes:
    import torch

    ones = torch.ones(64)
    if kind == "f8-e4m3":
        return {"key": ones.to(torch.float8_e4m3fn), "delta": ones.clone()}
    if kind == "f8-e5m2":
        return {"key": ones.clone(), "delta": ones.to(torch.float8_e5m2)}
    if kind == "f64-overflow":
        return {"key": ones.clone(), "delta": torch.full((64,), 1e300, dtype=torch.float64)}
    if kind == "deep-json-object":
        body = b'{"a":' * 5000 + b"1" + b"}" * 5000
        return struct.pack("<Q", len(body)) + body
    if kind == "deep-json-array":
        body = b"[" * 5000 + b"]" * 5000
        return struct.pack("<Q", len(body)) + body
    return {"key": ones.clone(), "delta": ones.clone()}


def _gated_dir(d: Path, kind: str) -> Path:
    from safetensors.torch import save_file

    tensors_path = "g.safetensors"
    if kind == "loop":
        (d / "g.safetensors").symlink_to(d / "g.safetensors")
    elif kind == "nul":
        tensors_path = "g\\u0000.safetensors"
    elif kind == "too-long":
        tensors_path = "t" * (NAME_MAX + 1) + ".safetensors"
    else:
        data = _tensors(kind)
        if isinstance(data, bytes):
            (d / "g.safetensors").write_bytes(data)
        else:
            save_file(data, str(d / "g.safetensors"))
    return write(d, GATED.replace('"g.safetensors"', f'"{tensors_path}"'))


TENSOR_CASES = [
    (
        "f8-e4m3",
        "tensor 'key' in 'g.safetensors' has dtype float8_e4m3fn; use float32, float16 or bfloat16",
    ),
    (
        "f8-e5m2",
        "tensor 'delta' in 'g.safetensors' has dtype float8_e5m2; use float32, float16 or bfloat16",
    ),
    (
        "f64-overflow",
        "tensor 'delta' in 'g.safetensors' holds values too large for float32 (largest "
        "magnitude 1e+300)",
    ),
    ("loop", "tensor file 'g.safetensors': symbolic link loop"),
    ("nul", "tensor file 'g\\x00.safetensors': name contains a NUL byte"),
    (
        "too-long",
        f"… ({NAME_MAX + 1 + len('.safetensors')} characters)': name is too long for the file "
        "system",
    ),
    (
        "deep-json-object",
        "tensor file 'g.safetensors' is not safetensors (header: arrays and objects nest "
        f"deeper than {MAX_NESTING} levels)",
    ),
    (
        "deep-json-array",
        "tensor file 'g.safetensors' is not safetensors (header: arrays and objects nest "
        f"deeper than {MAX_NESTING} levels)",
    ),
]


@pytest.mark.parametrize(("kind", "expected"), TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_tensor_file_without_model(tmp_path: Path, kind: str, expected: str) -> None:
    from meminject.tensorfile import read_tensors

    path = _gated_dir(tmp_path, kind)
    (entry,) = load_memories([path]).entries
    with pytest.raises(MemoryFileError) as info:
        read_tensors(entry, entry.memory.tensors, "tensors", ("key", "delta"))
    text = str(info.value)
    assert text.startswith(f"{path}:7: memory 'g': field 'tensors': ")
    assert expected in text
    assert "\n" not in text and "\x00" not in text


def test_tensor_values_are_checked_after_every_cast(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from meminject.tensorfile import read_tensors

    save_file(
        {"key": torch.ones(64), "delta": torch.full((64,), 1e5)}, str(tmp_path / "g.safetensors")
    )
    (entry,) = load_memories([write(tmp_path, GATED)]).entries
    tensors = read_tensors(entry, "g.safetensors", "tensors", ("key", "delta"))
    assert tensors["delta"].dtype == torch.float32
    with pytest.raises(MemoryFileError, match="too large for float16"):
        read_tensors(
            entry, "g.safetensors", "tensors", ("key", "delta"), also_finite_in=(torch.float16,)
        )


def test_validate_without_model_stays_light() -> None:
    # The new checks live in modules `validate` imports; torch must stay out of them.
    import subprocess

    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom meminject.cli import cli\n"
        "CliRunner().invoke(cli, ['validate', '--all-problems', ''])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
