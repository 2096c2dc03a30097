"""Hostile and model-dependent bad input, through ``meminject validate --model`` (exit 2, one
line). Together with tests/unit/test_memfile_errors.py (schema-level cases) this is the
corpus of malformed and hostile inputs; each case states its exact error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from meminject.cli import cli
from tests.unit.test_hostile_files import TENSOR_CASES, _gated_dir, assert_one_line_error, invoke

pytestmark = pytest.mark.integration

TEXT = '[[memory]]\nname = "m"\ntext = "Paris"\nlayer = 1\ntau = 2.0\n'
GATED = (
    '[[memory]]\nname = "g"\nstrategy = "gated"\nsite = "resid_post"\nlayer = 0\n'
    'tensors = "g.safetensors"\nboundary = 0.5\nhardness = 3.0\n'
)
ONES = torch.ones(64)


def text_file(d: Path, body: str, head: str = "version = 1\n") -> list[Path]:
    path = d / "m.toml"
    path.write_text(head + body, encoding="utf-8")
    return [path]


def gated(
    d: Path,
    tensors: dict[str, torch.Tensor] | bytes | None = None,
    body: str = GATED,
    head: str = "version = 1\n",
    name: str = "g.safetensors",
) -> list[Path]:
    if tensors is None:
        tensors = {"key": ONES, "delta": ONES}
    if isinstance(tensors, bytes):
        (d / name).write_bytes(tensors)
    else:
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(d / name))
    return text_file(d, body, head)


def pickled_bytes() -> bytes:
    # What torch.save / pickle would write, built by hand so no pickle is imported here.
    return b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x03key\x94K\x01u."


def header(length: int, body: bytes) -> bytes:
    return struct.pack("<Q", length) + body


def symlinked(d: Path) -> list[Path]:
    outside = d.parent / f"{d.name}-outside"
    outside.mkdir()
    save_file({"key": ONES.clone(), "delta": ONES.clone()}, str(outside / "t.safetensors"))
    (d / "g.safetensors").symlink_to(outside / "t.safetensors")
    return text_file(d, GATED)


def two_files_same_name(d: Path) -> list[Path]:
    (d / "a.toml").write_text("version = 1\n" + TEXT)
    (d / "b.toml").write_text("version = 1\n" + TEXT)
    return [d / "a.toml", d / "b.toml"]


def empty_dir(d: Path) -> list[Path]:
    (d / "sub").mkdir()
    (d / "sub" / "notes.txt").write_text("no memories")
    return [d / "sub"]


LYING = b'{"key":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}'
FP = "checkpoint-sha256:" + "0" * 64
Case = tuple[str, Callable[[Path], list[Path]], str]
CASES: list[Case] = [
    (
        "layer-out-of-range",
        lambda d: text_file(d, TEXT.replace("layer = 1", "layer = 2")),
        "{f}:5: memory 'm': field 'layer': layer 2 is out of range; the model has 2 layers (0–1)",
    ),
    (
        "head-out-of-range",
        lambda d: text_file(d, TEXT + "head = 4\n"),
        "{f}:7: memory 'm': field 'head': head 4 is out of range; the model has 4 heads (0–3)",
    ),
    (
        "position-beyond-context",
        lambda d: text_file(d, TEXT + "positions = [3, 500]\n"),
        "{f}:7: memory 'm': field 'positions': position 500 is outside the model's context of 128",
    ),
    (
        "model-d-model",
        lambda d: text_file(d, TEXT, "version = 1\n[model]\nd_model = 768\n"),
        "{f}:3: field 'model.d_model': [model] d_model = 768 but the loaded model has 64",
    ),
    (
        "model-n-layers",
        lambda d: text_file(d, TEXT, "version = 1\n[model]\nn_layers = 12\n"),
        "{f}:3: field 'model.n_layers': [model] n_layers = 12 but the loaded model has 2",
    ),
    (
        "model-n-heads",
        lambda d: text_file(d, TEXT, "version = 1\n[model]\nn_heads = 12\n"),
        "{f}:3: field 'model.n_heads': [model] n_heads = 12 but the loaded model has 4",
    ),
    (
        "model-d-vocab",
        lambda d: text_file(d, TEXT, "version = 1\n[model]\nd_vocab = 1000\n"),
        "{f}:3: field 'model.d_vocab': [model] d_vocab = 1000 but the loaded model has 50257",
    ),
    (
        "text-longer-than-context",
        lambda d: text_file(
            d, TEXT.replace('"Paris"', '"' + "go " * 300 + '"') + 'encoding = "layer"\n'
        ),
        "{f}:4: memory 'm': field 'text': the text is 302 tokens, longer than the model's context "
        "of 128",
    ),
    (
        "tensor-shape",
        lambda d: gated(d, {"key": torch.ones(32), "delta": torch.ones(32)}),
        "{f}:7: memory 'g': field 'tensors': tensor 'key' has shape (32,), but site 'resid_post' "
        "of this model needs (64,)",
    ),
    (
        "tensor-shapes-differ",
        lambda d: gated(d, {"key": ONES, "delta": torch.ones(4, 16)}),
        "{f}:7: memory 'g': field 'tensors': tensor 'delta' has shape (4, 16), but site "
        "'resid_post' of this model needs (64,)",
    ),
    (
        "tensor-file-missing",
        lambda d: text_file(d, GATED),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.safetensors' does not exist",
    ),
    (
        "tensor-path-dotdot",
        lambda d: gated(d, body=GATED.replace('"g.', '"../g.')),
        "{f}:7: memory 'g': field 'tensors': path '../g.safetensors' leaves the memory file's "
        "directory (or pass --allow-outside-paths)",
    ),
    (
        "tensor-path-absolute",
        lambda d: gated(d, body=GATED.replace('"g.safetensors"', '"/etc/passwd"')),
        "{f}:7: memory 'g': field 'tensors': absolute path '/etc/passwd' is not allowed; use a "
        "path relative to the memory file (or pass --allow-outside-paths)",
    ),
    (
        "tensor-symlink-out",
        symlinked,
        "{f}:7: memory 'g': field 'tensors': path 'g.safetensors' resolves outside the memory "
        "file's directory through a symlink (or pass --allow-outside-paths)",
    ),
    (
        "pickle-instead",
        lambda d: gated(d, pickled_bytes()),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.safetensors' is not safetensors (bad "
        "header length)",
    ),
    (
        "pt-file",
        lambda d: gated(
            d, pickled_bytes(), body=GATED.replace("g.safetensors", "g.pt"), name="g.pt"
        ),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.pt' is not safetensors (bad header "
        "length)",
    ),
    (
        "bin-file-zip",
        lambda d: gated(
            d,
            b"PK\x03\x04" + b"\x00" * 60,
            body=GATED.replace("g.safetensors", "g.bin"),
            name="g.bin",
        ),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.bin' is not safetensors (bad header "
        "length)",
    ),
    (
        "header-too-short",
        lambda d: gated(d, b"\x01\x02"),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.safetensors' is not safetensors (too "
        "short)",
    ),
    (
        "header-not-json",
        lambda d: gated(d, header(4, b"\xff\xfe{{")),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.safetensors' is not safetensors "
        "(header is not JSON)",
    ),
    (
        "header-json-list",
        lambda d: gated(d, header(2, b"[]")),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.safetensors' is not safetensors (bad "
        "header)",
    ),
    (
        "header-lies-about-data",
        lambda d: gated(d, header(len(LYING), LYING)),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.safetensors' is not valid safetensors: "
        "Error while deserializing header: incomplete metadata, file not fully covered",
    ),
    (
        "extra-tensor",
        lambda d: gated(d, {"key": ONES, "delta": ONES, "bias": ONES.clone()}),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.safetensors' must hold exactly key, "
        "delta; unexpected bias",
    ),
    (
        "missing-delta",
        lambda d: gated(d, {"key": ONES}),
        "{f}:7: memory 'g': field 'tensors': tensor file 'g.safetensors' must hold exactly key, "
        "delta; missing delta",
    ),
    (
        "integer-tensor",
        lambda d: gated(d, {"key": ONES, "delta": torch.ones(64, dtype=torch.int32)}),
        "{f}:7: memory 'g': field 'tensors': tensor 'delta' in 'g.safetensors' has dtype "
        "torch.int32; a float is needed",
    ),
    (
        "nan-delta",
        lambda d: gated(d, {"key": ONES, "delta": torch.full((64,), float("nan"))}),
        "{f}:7: memory 'g': field 'tensors': tensor 'delta' in 'g.safetensors' holds NaN or inf",
    ),
    (
        "inf-key",
        lambda d: gated(d, {"key": torch.full((64,), float("inf")), "delta": ONES}),
        "{f}:7: memory 'g': field 'tensors': tensor 'key' in 'g.safetensors' holds NaN or inf",
    ),
    (
        "zero-key",
        lambda d: gated(d, {"key": torch.zeros(64), "delta": ONES}),
        "{f}:7: memory 'g': field 'tensors': the key is all zeros; the gate is undefined",
    ),
    (
        "other-model",
        lambda d: gated(d, head=f'version = 1\n[model]\nfingerprint = "{FP}"\n'),
        "{f}:9: memory 'g': field 'tensors': made for another model (fingerprint " + FP + "), not "
        "the loaded model '{model}' ({fingerprint})",
    ),
    (
        "empty-tensor-path",
        lambda d: gated(d, body=GATED.replace('"g.safetensors"', '""')),
        "{f}:7: memory 'g': field 'tensors': String should have at least 1 character, got ''",
    ),
    (
        "gated-boundary-zero",
        lambda d: gated(d, body=GATED.replace("0.5", "0.0")),
        "{f}:8: memory 'g': field 'boundary': Input should be greater than 0, got 0.0",
    ),
    (
        "gated-hardness-nan",
        lambda d: gated(d, body=GATED.replace("hardness = 3.0", "hardness = nan")),
        "{f}:9: memory 'g': field 'hardness': Input should be greater than 0, got nan",
    ),
    (
        "gated-bad-site",
        lambda d: gated(d, body=GATED.replace("resid_post", "attn_result")),
        "{f}:5: memory 'g': field 'site': Input should be 'attn_z', 'attn_out', 'mlp_post', "
        "'mlp_out', 'resid_pre', 'resid_mid' or 'resid_post', got 'attn_result'",
    ),
    (
        "gated-no-tensors",
        lambda d: text_file(d, GATED.replace('tensors = "g.safetensors"\n', "")),
        "{f}:2: memory 'g': field 'tensors': required field is missing",
    ),
    (
        "oversized-file",
        lambda d: text_file(d, TEXT + "# " + "x" * (1 << 20) + "\n"),
        "{f}: file is 1048648 bytes, over the 1048576-byte limit for memory files",
    ),
    (
        "not-utf8",
        lambda d: [d / "m.toml"] if (d / "m.toml").write_bytes(b"version = 1\n\xff\xfe") else [],
        "{f}: not UTF-8 text (invalid start byte at byte 12)",
    ),
    ("missing-file", lambda d: [d / "nope.toml"], "{f}: no such file"),
    ("directory-without-toml", empty_dir, "{f}: directory holds no .toml memory files"),
    (
        "same-name-two-files",
        two_files_same_name,
        "{d}/b.toml:3: memory 'm': field 'name': duplicate memory name, already used by memory #1 "
        "of {d}/a.toml",
    ),
]


def test_corpus_size() -> None:
    from tests.unit.test_memfile_errors import CASES as SCHEMA_CASES

    assert len(CASES) + len(SCHEMA_CASES) >= 60


@pytest.mark.parametrize(("name", "build", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input(tmp_path: Path, gpt2, gpt2_dir: Path, name, build, expected) -> None:
    d = tmp_path / "set"
    d.mkdir()
    paths = build(d)
    message = expected.format(f=paths[0], d=d, model=gpt2_dir, fingerprint=gpt2.fingerprint())
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file() and not p.is_symlink()}
    result = CliRunner().invoke(cli, ["validate", *map(str, paths), "--model", str(gpt2_dir)])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"Error: {message}\n"
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file() and not p.is_symlink()}
    assert after == before  # nothing written, nothing lost


@pytest.mark.parametrize(("kind", "expected"), TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_tensor_file_with_model(tmp_path: Path, gpt2_dir: Path, kind: str, expected: str) -> None:
    path = _gated_dir(tmp_path, kind)
    result = invoke(str(path), "--model", str(gpt2_dir))
    assert_one_line_error(result, f"Error: {path}:7: memory 'g': field 'tensors': ")
    assert expected in result.stderr
