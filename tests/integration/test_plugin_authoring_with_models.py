"""Plugin authoring with a (tiny) real model: encoder parameters in sweeps and in Python
memories, a broken encoder reported as its plugin's fault (issue 17), and the example
plugin packages composing on a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import meminject
from meminject import hookimpl
from meminject.errors import EXIT_RUNTIME, PluginError
from meminject.memfile import load_memory_set
from meminject.plugins import ENV_VAR, build_registry
from meminject.sweep import SweepConfig, run_sweep
from meminject.testing import invoke_cli, registered_plugins, write_memory_file
from tests.conftest import write
from tests.integration.test_sweep import ROWS, assert_matches_reference
from tests.unit.test_plugin_authoring import _ScaledPlugin
from tests.unit.test_plugin_packages import EXAMPLES, needs

pytestmark = pytest.mark.integration


@pytest.fixture
def scaled_registry():
    return build_registry([("scaled", _ScaledPlugin())], load_entrypoints=False)


def test_a_sweep_passes_the_labels_parameters_to_the_encoder(gpt2, scaled_registry):
    # scaled{scale = 2} at τ = 1.5 is unembed at τ = 3, cell for cell; the default
    # (scale = 1) is unembed itself. Both also match the reference loop.
    labels = ("scaled{scale = 2.0}", "scaled")
    config = SweepConfig(layers=(1,), taus=(1.5,), encodings=labels, controls=1)
    records = run_sweep(gpt2, ROWS[:3], config, registry=scaled_registry).records
    assert_matches_reference(gpt2, ROWS[:3], records, "first-token", registry=scaled_registry)
    plain = run_sweep(
        gpt2,
        ROWS[:3],
        SweepConfig(layers=(1,), taus=(3.0, 1.5), controls=1),
        registry=scaled_registry,
    ).records
    for label, tau in zip(labels, (3.0, 1.5), strict=True):
        ours = records[records["encoding"] == label]["p_after"].to_numpy()
        theirs = plain[plain["tau"] == tau]["p_after"].to_numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert not np.allclose(
        records[records["encoding"] == labels[0]]["p_after"],
        records[records["encoding"] == labels[1]]["p_after"],
    )


def test_sweep_cli_takes_encoding_parameters_and_names_bad_ones(toyworld, scaled_registry):
    base = ["sweep", "toyworld", "--model", "toyworld", "--layers", "1", "--tau", "2"]
    args = [*base, "--limit", "3", "--no-progress"]
    good = invoke_cli([*args, "--encoding", 'unembed,scaled{source = "embed"}'], scaled_registry)
    assert good.exit_code == 0, good.output
    assert 'scaled{source = "embed"}' in good.output
    bad = invoke_cli([*args, "--encoding", "scaled{scael = 2.0}"], scaled_registry)
    assert bad.exit_code == 2
    assert "did you mean 'scale'?" in bad.output


def test_python_memories_take_encoder_parameters_without_a_file(
    toyworld, scaled_registry, tmp_path
):
    prompt = "The country that uses the greilek is located in"
    table = {"name": "m", "text": "Rechelur", "encoding": "scaled", "layer": 1, "tau": 2.0}
    path = write_memory_file(
        tmp_path / "m.toml",
        """
        version = 1

        [[memory]]
        name = "m"
        text = "Rechelur"
        encoding = "scaled"
        layer = 1
        tau = 2.0

        [memory.params]
        scale = 3.0
        """,
    )
    tokens = toyworld.to_tokens(prompt)
    logits = {}
    with registered_plugins(("scaled", _ScaledPlugin()), entry_points=False):
        for key, memories in {
            "dict": {**table, "params": {"scale": 3.0}},
            "file": [path],
            "plain": None,
        }.items():
            toyworld.encodings.clear()
            with torch.no_grad(), meminject.inject(toyworld, memories):
                logits[key] = toyworld.bridge(tokens)[0, -1]
        generated = meminject.generate(
            toyworld, prompt, [{**table, "params": {"scale": 3.0}}], max_new_tokens=2
        )
    toyworld.encodings.clear()
    torch.testing.assert_close(logits["dict"], logits["file"])
    assert (logits["dict"] - logits["plain"]).abs().max() > 1e-3
    assert generated.completion


class _BadShape:
    @staticmethod
    @hookimpl
    def register_encoders(register):
        register("short", lambda request: request.model.bridge.W_U[:3, 0].detach().clone())
        register("ints", lambda request: torch.zeros(request.model.dims.d_model, dtype=torch.long))


@pytest.mark.parametrize(
    ("encoding", "problem"),
    [("short", "returned shape (3,)"), ("ints", "returned dtype int64, not a float")],
)
def test_a_broken_encoder_is_its_plugins_error(toyworld, tmp_path, encoding, problem):
    path = write_memory_file(
        tmp_path / "m.toml",
        f"""
        version = 1

        [[memory]]
        name = "bridge"
        text = "Rechelur"
        encoding = "{encoding}"
        layer = 1
        tau = 2.0
        """,
    )
    registry = build_registry([("bad-shape", _BadShape())], load_entrypoints=False)
    with (
        registered_plugins(("bad-shape", _BadShape()), entry_points=False),
        pytest.raises(PluginError) as info,
    ):
        meminject.generate(toyworld, "The capital of", [path], max_new_tokens=1)
    toyworld.encodings.clear()
    message = str(info.value)
    assert message.startswith(f"plugin 'bad-shape': encoder '{encoding}' {problem} for {path}:")
    assert "memory 'bridge'" in message and f"({toyworld.dims.d_model},)" in message
    result = invoke_cli(["generate", "The capital of", "-m", str(path)], registry)
    assert result.exit_code == EXIT_RUNTIME  # the plugin's bug, not the user's input
    assert "plugin 'bad-shape'" in result.output


@needs(*EXAMPLES)
def test_the_examples_compose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2) -> None:
    """A relative memory encoded by contrast: one plugin's strategy, the other's encoder,
    both found through entry points, on a real model."""
    from meminject.engine import compile_memories

    monkeypatch.setenv(ENV_VAR, "contrast,relative")
    registry = build_registry()
    path = write(
        tmp_path / "both.toml",
        'version = 1\n[[memory]]\nname = "kind"\nstrategy = "relative"\ntext = "Love"\n'
        'encoding = "contrast"\nsite = "resid_pre"\nlayer = 1\ntau = 0.5\n'
        '[memory.params]\nnegative = "Hate"\n',
    )
    memory = load_memory_set([path], registry).entries[0].memory
    assert type(memory).__name__ == "RelativeMemory"
    assert type(memory.encoder_params()).__name__ == "ContrastParams"
    hooks = compile_memories(gpt2, [path], registry)
    assert [(h.plugin, h.hook.hook_name) for h in hooks] == [
        ("relative", "blocks.1.hook_resid_pre")
    ]
