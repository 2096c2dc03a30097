"""The contrast encoder on real tiny models: its parameters in files and in the schema,
its vector against an independent computation, and its use by the ``add`` strategy.

Fixtures (``meminject_tiny_model``, ``meminject_registry``, ``meminject_memory_file``,
``meminject_cli``) come from meminject's pytest plugin; no conftest is needed.
"""

from __future__ import annotations

import json
from importlib import metadata

import meminject_contrast
import pytest
import torch
from meminject_contrast import ContrastParams, encode_contrast

from meminject.engine import compile_memories, inject
from meminject.errors import MemoryFileError
from meminject.extension import EncodeRequest
from meminject.memfile import load_memory_set
from meminject.sites import hook_name

PLUGIN = ("contrast", meminject_contrast)

MEMORY = """
version = 1

[[memory]]
name = "love"
text = "Love"
encoding = "contrast"
site = "resid_pre"
layer = 1
tau = 4.0

[memory.params]
{params}
"""


@pytest.fixture
def registry(meminject_registry):
    return meminject_registry(PLUGIN)


def memory_of(path, registry):
    return load_memory_set([path], registry).entries[0].memory


def test_registers_encoder_with_its_params_model(registry) -> None:
    entry = registry.encoders["contrast"]
    assert entry.params_model is ContrastParams and entry.plugin == "contrast"


def test_params_appear_in_meminject_schema(registry, meminject_cli) -> None:
    result = meminject_cli("schema")
    assert result.exit_code == 0, result.output
    add = json.loads(result.output)["$defs"]["AddMemory"]["properties"]
    assert "contrast" in add["encoding"]["enum"]
    params = {s["title"]: s for s in add["params"]["anyOf"]}["ContrastParams"]
    assert set(params["properties"]) == {"negative", "activation", "position", "normalize"}
    assert params["required"] == ["negative"] and params["additionalProperties"] is False


def test_encoders_command_lists_it(registry, meminject_cli) -> None:
    result = meminject_cli("encoders")
    assert "contrast  [contrast]  v = act(text) − act(negative)" in result.output


def test_params_are_validated_in_memory_files(registry, meminject_memory_file) -> None:
    path = meminject_memory_file(MEMORY.format(params='negative = "Hate"\nnormalize = true'))
    memory = memory_of(path, registry)
    assert memory.encoder_params() == ContrastParams(negative="Hate", normalize=True)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("normalize = true", r"field 'params.negative': required field is missing"),
        ('negative = "Hate"\nnegtive = "x"', r"unknown key 'negtive' for encoder 'contrast'"),
        ('negative = "Hate"\nactivation = "attn_z"', r"field 'params.activation'"),
        ('negative = "Hate"\nnormalize = "yes"', r"field 'params.normalize'"),
        ('negative = ""', r"field 'params.negative'"),
    ],
)
def test_bad_params_name_the_field(registry, meminject_memory_file, params, message) -> None:
    path = meminject_memory_file(MEMORY.format(params=params))
    with pytest.raises(MemoryFileError, match=message) as info:
        load_memory_set([path], registry)
    assert "memory 'love'" in str(info.value)


def test_missing_params_table_is_an_error(registry, meminject_memory_file) -> None:
    path = meminject_memory_file(MEMORY.format(params="").replace("[memory.params]", ""))
    with pytest.raises(MemoryFileError, match=r"params\.negative"):
        load_memory_set([path], registry)


def reference_activation(model, text, hook_name, position):
    """The same quantity through a different TransformerLens path (run_with_cache, whole
    forward), so the encoder's early stop and slicing are checked, not repeated."""
    tokens = model.to_tokens(text)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens, names_filter=[hook_name])
    acts = cache[hook_name][0, 1:].float()  # the tiny GPT-2 prepends BOS
    return acts[-1] if position == "last" else acts.mean(0)


@pytest.mark.parametrize("activation", ["attn_out", "mlp_out", "resid_pre", "resid_post"])
@pytest.mark.parametrize("position", ["last", "mean"])
def test_vector_is_the_difference_of_activations(
    registry, meminject_tiny_model, meminject_memory_file, activation, position
) -> None:
    params = f'negative = "I hate you because"\nactivation = "{activation}"\n'
    params += f'position = "{position}"'
    memory = memory_of(meminject_memory_file(MEMORY.format(params=params)), registry)
    vector = encode_contrast(EncodeRequest(meminject_tiny_model, memory, memory.encoder_params()))
    hook = hook_name(activation, 1)
    expected = reference_activation(meminject_tiny_model, "Love", hook, position)
    expected = expected - reference_activation(
        meminject_tiny_model, "I hate you because", hook, position
    )
    assert vector.shape == (meminject_tiny_model.dims.d_model,)
    torch.testing.assert_close(vector.float(), expected, rtol=1e-5, atol=1e-5)


def test_normalize_gives_a_unit_vector(registry, meminject_tiny_model, meminject_memory_file):
    path = meminject_memory_file(MEMORY.format(params='negative = "Hate"\nnormalize = true'))
    memory = memory_of(path, registry)
    vector = encode_contrast(EncodeRequest(meminject_tiny_model, memory, memory.encoder_params()))
    assert float(vector.norm()) == pytest.approx(1.0, abs=1e-5)


def test_add_strategy_injects_tau_times_the_vector(
    registry, meminject_tiny_model, meminject_memory_file
) -> None:
    """End to end through the engine: the logits equal a hand-written hook adding τ·v."""
    model = meminject_tiny_model
    path = meminject_memory_file(MEMORY.format(params='negative = "Hate"'))
    memory = memory_of(path, registry)
    vector = encode_contrast(EncodeRequest(model, memory, memory.encoder_params()))
    tokens = model.to_tokens("I think that you are")

    def add(activation, hook):
        return activation + 4.0 * vector

    with torch.no_grad():
        expected = model.bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", add)])
        baseline = model.bridge(tokens)
        with inject(model, [path]):
            injected = model.bridge(tokens)
    torch.testing.assert_close(injected, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(injected, baseline, atol=1e-3)


def test_identical_texts_are_a_located_error(
    registry, meminject_tiny_model, meminject_memory_file
) -> None:
    path = meminject_memory_file(MEMORY.format(params='negative = "Love"'))
    with pytest.raises(MemoryFileError, match=r"memory 'love': field 'text': .*same activation"):
        compile_memories(meminject_tiny_model, [path], registry)


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_other_architectures(registry, meminject_tiny_models, meminject_memory_file, arch):
    model = meminject_tiny_models(arch)
    path = meminject_memory_file(MEMORY.format(params='negative = "Hate"\nnormalize = true'))
    memory = memory_of(path, registry)
    vector = encode_contrast(EncodeRequest(model, memory, memory.encoder_params()))
    assert vector.shape == (model.dims.d_model,) and torch.isfinite(vector).all()
    hooks = compile_memories(model, [path], registry)
    assert [h.hook.hook_name for h in hooks] == ["blocks.1.hook_resid_pre"]


def installed() -> bool:
    try:
        metadata.distribution("meminject-contrast")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not installed(), reason="meminject-contrast is not pip-installed")
def test_installed_package_is_found_through_its_entry_point(
    meminject_registry, monkeypatch
) -> None:
    monkeypatch.setenv("MEMINJECT_LOAD_PLUGINS", "meminject-contrast")
    registry = meminject_registry(entry_points=True)
    assert registry.encoders["contrast"].plugin == "contrast"
    assert {p.name: p for p in registry.plugins}["contrast"].version == "0.1.0"
