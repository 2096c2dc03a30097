"""The relative strategy on real tiny models: file format, the update it applies, its
independence of order and of the KV cache, and its no-op cases.

Fixtures come from meminject's pytest plugin (``meminject_tiny_model``,
``meminject_registry``, ``meminject_memory_file``, ``meminject_cli``).
"""

from __future__ import annotations

import json
from importlib import metadata

import meminject_relative
import pytest
import torch

from meminject import hookimpl
from meminject.engine import compile_memories, inject
from meminject.errors import MemoryFileError
from meminject.extension import InjectionContext
from meminject.generation import generate
from meminject.memfile import load_memory_set

PLUGIN = ("relative", meminject_relative)


def memory(name="paris", text="Paris", layer=1, tau=0.5, extra=""):
    return f"""
[[memory]]
name = "{name}"
strategy = "relative"
text = "{text}"
layer = {layer}
tau = {tau}
{extra}
"""


def file_of(*memories: str) -> str:
    return "version = 1\n" + "".join(memories)


@pytest.fixture
def registry(meminject_registry):
    return meminject_registry(PLUGIN)


def test_strategy_and_its_memory_model_are_in_the_schema(registry, meminject_cli) -> None:
    result = meminject_cli("schema")
    assert result.exit_code == 0, result.output
    defs = json.loads(result.output)["$defs"]
    relative = defs["RelativeMemory"]
    assert relative["properties"]["strategy"]["const"] == "relative"
    assert {"strategy", "tau", "text", "layer", "name"} <= set(relative["required"])
    assert "fraction of the activation's norm" in relative["properties"]["tau"]["description"]


def test_strategies_command_lists_it(registry, meminject_cli) -> None:
    assert "relative  [relative]  Add τ·‖a‖·v/‖v‖" in meminject_cli("strategies").output


def test_file_loads_with_add_fields_and_tau_alias(registry, meminject_memory_file) -> None:
    text = file_of(memory(extra='head = 2\npositions = "last"').replace("tau", '"τ"'))
    loaded = load_memory_set([meminject_memory_file(text)], registry).entries[0].memory
    assert type(loaded).__name__ == "RelativeMemory"
    assert (loaded.tau, loaded.head, loaded.resolved_site) == (0.5, 2, "attn_result")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('tensors = "x.safetensors"', r"field 'tensors'"),
        ('site = "attn_z"', r"field 'site'"),
        ('"τ" = 1.0', r"field 'τ': key 'τ' repeats"),
    ],
)
def test_bad_memories_name_the_field(registry, meminject_memory_file, extra, message) -> None:
    path = meminject_memory_file(file_of(memory(extra=extra)))
    with pytest.raises(MemoryFileError, match=message):
        load_memory_set([path], registry)


def unit_unembed(model, text):
    ids = list(dict.fromkeys(model.tokenize(text, prepend_bos=False)))
    vector = model.bridge.W_U[:, ids].sum(-1).float()
    return vector / vector.norm()


def test_adds_tau_times_the_activation_norm(
    registry, meminject_tiny_model, meminject_memory_file
) -> None:
    """The logits equal those of a hand-written hook computing a + τ·‖a‖·v̂."""
    model = meminject_tiny_model
    path = meminject_memory_file(file_of(memory(tau=0.75, extra='site = "resid_post"')))
    direction = unit_unembed(model, "Paris")
    tokens = model.to_tokens("The capital of France is")

    def relative(activation, hook):
        return activation + 0.75 * activation.norm(dim=-1, keepdim=True) * direction

    with torch.no_grad():
        expected = model.bridge.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_resid_post", relative)]
        )
        with inject(model, [path]):
            injected = model.bridge(tokens)
    torch.testing.assert_close(injected, expected, rtol=1e-4, atol=1e-4)


def test_head_memories_scale_by_that_heads_result(
    registry, meminject_tiny_model, meminject_memory_file
) -> None:
    model = meminject_tiny_model
    path = meminject_memory_file(file_of(memory(tau=2.0, extra="head = 3")))
    direction = unit_unembed(model, "Paris")
    tokens = model.to_tokens("The capital of France is")

    def relative(result, hook):
        out = result.clone()
        out[:, :, 3] += 2.0 * result[:, :, 3].norm(dim=-1, keepdim=True) * direction
        return out

    with torch.no_grad():
        model.bridge.set_use_attn_result(True)
        try:
            expected = model.bridge.run_with_hooks(
                tokens, fwd_hooks=[("blocks.1.attn.hook_result", relative)]
            )
        finally:
            model.bridge.set_use_attn_result(False)
        with inject(model, [path]):
            injected = model.bridge(tokens)
    torch.testing.assert_close(injected, expected, rtol=1e-4, atol=1e-4)


def test_added_length_is_tau_times_the_norm_at_every_position(
    registry, meminject_tiny_model, meminject_memory_file
) -> None:
    """The property that makes τ portable: ‖Δa‖ = |τ|·‖a‖ whatever the activation's scale."""
    path = meminject_memory_file(file_of(memory(tau=-0.3, extra='site = "resid_pre"')))
    (hook,) = compile_memories(meminject_tiny_model, [path], registry)
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.01, 1.0, 30.0, 500.0]).view(1, 4, 1)
    activation = torch.randn(2, 4, 64, generator=generator) * scales
    added = hook.hook.body(activation, InjectionContext()) - activation
    torch.testing.assert_close(added.norm(dim=-1), 0.3 * activation.norm(dim=-1))


def test_memories_at_one_site_do_not_depend_on_order(
    registry, meminject_tiny_model, meminject_memory_file
) -> None:
    model = meminject_tiny_model
    a = memory("a", "Paris", tau=1.5, extra='site = "resid_pre"')
    b = memory("b", "London", tau=-0.5, extra='site = "resid_pre"')
    first = meminject_memory_file(file_of(a, b), "ab.toml")
    second = meminject_memory_file(file_of(b, a), "ba.toml")
    tokens = model.to_tokens("The capital of France is")
    with torch.no_grad():
        with inject(model, [first]):
            ab = model.bridge(tokens)
        with inject(model, [second]):
            ba = model.bridge(tokens)
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ['"all"', '"prompt"', '"generated"', '"last"', "[1, -1]"])
def test_kv_cache_on_and_off_give_the_same_tokens(
    registry, meminject_tiny_model, meminject_memory_file, positions
) -> None:
    path = meminject_memory_file(
        file_of(memory(tau=3.0, layer=0, extra=f"positions = {positions}"))
    )
    runs = [
        generate(
            meminject_tiny_model,
            "The capital of France is",
            [path],
            max_new_tokens=6,
            use_kv_cache=cache,
        )
        for cache in (True, False)
    ]
    assert runs[0].new_tokens == runs[1].new_tokens


@pytest.mark.parametrize("extra", ["tau = 0.0", "enabled = false\ntau = 1.0"])
def test_inactive_memories_compile_to_nothing(
    registry, meminject_tiny_model, meminject_memory_file, extra
) -> None:
    text = file_of(memory().replace("tau = 0.5\n", "") + extra + "\n")
    assert compile_memories(meminject_tiny_model, [meminject_memory_file(text)], registry) == []


class ZeroEncoder:
    """An encoder whose vector has no direction, to test the strategy's refusal."""

    @hookimpl
    def register_encoders(self, register):
        register("zero", lambda request: torch.zeros(request.model.dims.d_model))


def test_zero_vector_is_a_located_error(
    meminject_registry, meminject_tiny_model, meminject_memory_file
) -> None:
    registry = meminject_registry(PLUGIN, ("zero", ZeroEncoder()))
    path = meminject_memory_file(file_of(memory(extra='encoding = "zero"')))
    with pytest.raises(MemoryFileError, match=r"memory 'paris': field 'text': .*norm 0"):
        compile_memories(meminject_tiny_model, [path], registry)


def installed() -> bool:
    try:
        metadata.distribution("meminject-relative")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not installed(), reason="meminject-relative is not pip-installed")
def test_installed_package_is_found_through_its_entry_point(
    meminject_registry, monkeypatch
) -> None:
    monkeypatch.setenv("MEMINJECT_LOAD_PLUGINS", "relative")
    registry = meminject_registry(entry_points=True)
    assert registry.strategies["relative"].plugin == "relative"
