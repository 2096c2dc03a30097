"""Backends registered by plugins through ``register_backends``, the backend choice, and
the declarative form of compiled ``add`` memories."""

from __future__ import annotations

import types

import pytest
import torch

from meminject import hookimpl
from meminject.backends import BackendUnavailable, get_backend, select_backend
from meminject.engine import compile_memories, inject
from meminject.errors import BadInputError, PluginError
from meminject.generation import generate, generate_batch
from meminject.testing import invoke_cli, registered_plugins

pytestmark = pytest.mark.integration

PROMPT = "The first president of the United States fought in the"
MEMORIES = [
    {"name": "a", "text": "Paris Rome", "layer": 1, "head": 2, "tau": 6.0},
    {"name": "b", "text": "Berlin", "layer": 0, "site": "resid_pre", "tau": 3.0},
    {"name": "c", "text": "Tokyo", "layer": 1, "site": "mlp_out", "tau": 4.0, "positions": [1, -1]},
]


class SameLengthOnly:
    """The hf backend without padded batches: the decoding loop must then batch only
    prompts of one length, and still give every prompt its solo tokens."""

    name = "unpadded"

    def __init__(self, model):
        self.inner = get_backend(model, "hf")
        self.features = self.inner.features - {"padded_batch"}
        self.batches: list[int] = []

    def unsupported(self, hook_name):
        return self.inner.unsupported(hook_name)

    def hooks(self, bodies):
        return self.inner.hooks(bodies)

    def forward(self, step):
        assert step.attention_mask is None  # it was never asked to pad
        self.batches.append(step.tokens.shape[0])
        return self.inner.forward(step)


def plugin_module():
    module = types.ModuleType("unpadded_backend")

    @hookimpl
    def register_backends(register):
        register("unpadded", SameLengthOnly, "hf without padding")

    module.register_backends = register_backends
    return module


def test_a_plugin_backend_is_selected_by_name_and_batches_by_length(model_dirs):
    from meminject.loading import load_model

    model = load_model(model_dirs["llama"])
    prompts = ["Hello there", "A cat sat on the", "Hello world", PROMPT, "Rome is"]
    with registered_plugins(("unpadded", plugin_module()), entry_points=False) as registry:
        assert list(registry.backends) == ["hf", "bridge", "unpadded"]
        got = generate_batch(model, prompts, MEMORIES, batch_size=4, backend="unpadded")
        want = [generate(model, p, MEMORIES, backend="hf") for p in prompts]
        assert [g.new_tokens for g in got] == [g.new_tokens for g in want]
        assert {g.backend for g in got} == {"unpadded"}
        lengths = sorted(len(model.tokenize(p)) for p in prompts)
        first_forwards = model.backends["unpadded"].batches
        # "Hello there" and "Hello world" have one length and share the only batch of 2.
        assert lengths.count(lengths[0]) == 2 and 2 in first_forwards
        assert max(first_forwards) == 2
        # Not an auto candidate.
        assert generate(model, PROMPT, MEMORIES, max_new_tokens=1).backend == "hf"
        listing = invoke_cli(["backends"], registry=registry)
        assert "unpadded  [unpadded]  hf without padding" in listing.output
        assert "hf  [meminject.default_plugins.backends]  (auto)" in listing.output


def test_backend_registration_mistakes_name_the_plugin():
    def plugin(register_fn):
        module = types.ModuleType("bad_backend")
        module.register_backends = hookimpl(register_fn)
        return module

    for registered, message in (
        (lambda register: register("auto", dict), "'auto' is reserved"),
        (lambda register: register("mine", 3), "factory is not callable"),
        (lambda register: register("hf", dict), "already registered by plugin 'meminject"),
    ):
        with (
            pytest.raises(PluginError, match=message),
            registered_plugins(("bad", plugin(registered))),
        ):
            pass


def test_a_factory_that_returns_no_backend_is_the_plugins_fault(gpt2):
    module = types.ModuleType("broken_backend")

    @hookimpl
    def register_backends(register):
        register("broken", lambda model: object())

    module.register_backends = register_backends
    with (
        registered_plugins(("broken", module), entry_points=False),
        pytest.raises(PluginError, match=r"does not implement meminject\.backends\.Backend"),
    ):
        generate(gpt2, PROMPT, max_new_tokens=1, backend="broken")


def test_unknown_and_unavailable_backends_are_bad_input(gpt2):
    with pytest.raises(BadInputError, match="unknown backend 'fast'; choose one of auto, hf"):
        generate(gpt2, PROMPT, max_new_tokens=1, backend="fast")
    # A hook point only the bridge has: auto says why hf was passed over; hf refuses.
    point = "blocks.1.attn.hook_pattern"
    backend, note = select_backend(gpt2, [point])
    assert backend.name == "bridge" and point in (note or "")
    with pytest.raises(BackendUnavailable, match="the hf backend cannot run this"):
        select_backend(gpt2, [point], "hf")


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_additions_are_the_add_memories_as_data(model_dirs, arch):
    """Applying a compiled add hook's ``additions`` by hand, with nothing but tensor
    additions at their positions, gives the logits the hook's body gives."""
    from meminject.loading import load_model

    model = load_model(model_dirs[arch])
    compiled = compile_memories(model, MEMORIES)
    tokens = model.to_tokens(PROMPT)
    seq = tokens.shape[1]
    with torch.no_grad(), inject(model, compiled):
        by_body = model.bridge(tokens, return_type="logits")

    def adder(additions):
        def hook(activation, hook):
            out = activation.clone()
            for addition in additions:
                if addition.positions == "all":
                    out += addition.vector
                else:
                    index = [p % seq for p in addition.positions]
                    out[:, index] += addition.vector
            return out

        return hook

    fwd = [(c.hook.hook_name, adder(c.hook.additions)) for c in compiled]
    assert all(c.hook.additions for c in compiled)
    sites = {a.site for c in compiled for a in c.hook.additions}
    assert sites == {"attn_out", "resid_pre", "mlp_out"}  # the per-head one is lowered
    with torch.no_grad():
        by_data = model.bridge.run_with_hooks(tokens, fwd_hooks=fwd)
        baseline = model.bridge(tokens, return_type="logits")
    assert (by_body - baseline).abs().max() > 1e-2
    torch.testing.assert_close(by_data, by_body, rtol=0, atol=1e-5)
