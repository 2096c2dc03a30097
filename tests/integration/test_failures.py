"""Failures inside plugins during generation, and determinism across processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch

from meminject import hookimpl
from meminject.errors import InjectionError, PluginError
from meminject.extension import SiteHook, Strategy
from meminject.generation import generate
from meminject.schema import MemoryBase
from meminject.testing import registered_plugins
from tests.conftest import write

pytestmark = pytest.mark.integration


class Explode(Strategy):
    name = "explode"

    class memory_model(MemoryBase):
        strategy: Literal["explode"]

    def compile(self, memories, ctx):
        def body(activation, context):
            if context.offset > 0:  # fail on the first cached step, not the prompt pass
                raise ValueError("bad tensor math")
            return activation

        return [SiteHook(f"blocks.{m.layer}.hook_resid_pre", body) for m in memories]


class ExplodePlugin:
    @hookimpl
    def register_strategies(self, register):
        register("explode", Explode)


class BrokenEncoder:
    @hookimpl
    def register_encoders(self, register):
        def encoder(request):
            raise RuntimeError("encoder crashed")

        register("broken", encoder)


def live_hooks(model) -> int:
    return sum(len(hp.fwd_hooks) for hp in model.bridge.hook_dict.values())


def test_strategy_raising_inside_a_hook_is_named_and_hooks_are_restored(gpt2, tmp_path):
    path = write(
        tmp_path / "x.toml",
        'version = 1\n[[memory]]\nname = "x"\nstrategy = "explode"\nlayer = 1\n',
    )
    tokens = gpt2.to_tokens("The capital of France is")
    with torch.no_grad():
        plain = gpt2.bridge(tokens)
    with registered_plugins(("exploder", ExplodePlugin())), pytest.raises(InjectionError) as info:
        generate(gpt2, "The capital of France is", path, max_new_tokens=5)
    assert str(info.value) == (
        "strategy 'explode' (plugin 'exploder') failed at blocks.1.hook_resid_pre: "
        "ValueError('bad tensor math')"
    )
    assert live_hooks(gpt2) == 0
    with torch.no_grad():
        assert torch.equal(gpt2.bridge(tokens), plain)


def test_encoder_raising_is_named(gpt2, tmp_path):
    path = write(
        tmp_path / "b.toml",
        'version = 1\n[[memory]]\nname = "b"\ntext = "Paris"\n'
        'encoding = "broken"\nlayer = 1\ntau = 1.0\n',
    )
    with (
        registered_plugins(("broken-encoder", BrokenEncoder())),
        pytest.raises(PluginError) as info,
    ):
        generate(gpt2, "The capital of France is", path, max_new_tokens=1)
    assert str(info.value) == (
        "plugin 'broken-encoder': encoder 'broken' failed on memory 'b': "
        "RuntimeError('encoder crashed')"
    )
    assert live_hooks(gpt2) == 0


def test_same_inputs_and_seed_give_bit_identical_output_across_processes(
    gpt2_dir: Path, tmp_path: Path
):
    memory = write(
        tmp_path / "m.toml",
        'version = 1\n[[memory]]\nname = "m"\n'
        'text = "George Washington"\nlayer = 1\nhead = 2\ntau = 6.0\n',
    )
    args = [
        sys.executable,
        "-m",
        "meminject.cli",
        "generate",
        "The first president was",
        "-m",
        str(memory),
        "--model",
        str(gpt2_dir),
        "--compare",
        "--json",
        "--temperature",
        "1.0",
        "--seed",
        "11",
        "--max-new-tokens",
        "12",
        "--show-top",
        "5",
    ]
    runs = [
        subprocess.run(args, capture_output=True, text=True, timeout=300, check=True).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    baseline, injected = (json.loads(line) for line in runs[0].splitlines())
    assert baseline["memories"] == [] and injected["memories"] == ["m"]
    assert len(injected["new_tokens"]) == 12
