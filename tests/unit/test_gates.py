"""The gates of local memories (issue 27, defect 3): the local gates stay closed on an
activation orthogonal to the key, whatever its length and whatever their parameters; the
blog's projection gate does not, which is why its boundary is bounded below 1."""

from __future__ import annotations

import math

import pytest
import torch

from meminject.extension import InjectionContext
from meminject.gates import GATES, gate_body, gate_values


def _bank(gate: str, value: float, hardness: float, key: torch.Tensor):
    kinds = torch.tensor([GATES[gate].code])
    return key[None], torch.tensor([value]), torch.tensor([hardness]), kinds


def _orthogonal(key: torch.Tensor, generator: torch.Generator, n: int) -> torch.Tensor:
    rows = torch.randn(n, key.numel(), generator=generator, dtype=torch.float64)
    rows -= (rows @ key)[:, None] * key[None] / (key @ key)
    scales = torch.logspace(-3, 3, n, dtype=torch.float64)[:, None]
    return rows / rows.norm(dim=-1, keepdim=True) * key.norm() * scales


@pytest.mark.parametrize("gate", ["cosine", "distance"])
@pytest.mark.parametrize("hardness", [0.5, 1.0, 3.0])
def test_an_activation_orthogonal_to_the_key_leaves_a_local_gate_closed(gate, hardness):
    generator = torch.Generator().manual_seed(0)
    key = torch.randn(64, generator=generator, dtype=torch.float64) * 7
    flat = _orthogonal(key, generator, 50)[None]  # [batch 1, 50 positions, width]
    assert float((flat[0] @ key).abs().max()) < 1e-9 * float(key.norm()) ** 2
    for value in GATES[gate].grid:
        keys, boundary, hard, kinds = _bank(gate, value, hardness, key)
        s = gate_values(flat, keys, boundary.double(), hard.double(), kinds)
        assert float(s.abs().max()) == 0.0, (gate, value)
        # At the key itself the gate is open.
        at_key = gate_values(key[None, None], keys, boundary.double(), hard.double(), kinds)
        assert float(at_key) == pytest.approx(1.0)


def test_the_projection_gate_opens_on_orthogonal_activations_below_1_over_e():
    generator = torch.Generator().manual_seed(1)
    key = torch.randn(64, generator=generator, dtype=torch.float64)
    flat = _orthogonal(key, generator, 10)[None]
    for b in GATES["projection"].grid:
        keys, boundary, hard, _ = _bank("projection", b, 3.0, key)
        s = gate_values(flat, keys, boundary.double(), hard.double())
        expected = math.exp(-(b ** (-6.0)))
        assert torch.allclose(s, torch.full_like(s, expected), rtol=1e-4, atol=1e-300)
        assert expected < math.exp(-1)
    # The Nepal boundaries learn used to choose (1.025, 1.225) opened it to 0.42 and 0.74.
    for b, opened in ((1.025, 0.42), (1.225, 0.74)):
        assert math.exp(-(b ** (-6.0))) == pytest.approx(opened, abs=0.01)


def test_a_mixed_bank_gates_each_memory_by_its_own_gate():
    """One bank (one hook point) holding all three gates: each memory's delta is added by its
    own gate, every gate reading the activation as it arrived."""
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(3, 16, generator=generator)
    deltas = torch.eye(3, 16)
    kinds = torch.tensor([GATES[g].code for g in ("projection", "cosine", "distance")])
    boundary = torch.tensor([0.5, 0.9, 0.5])
    hardness = torch.tensor([3.0, 3.0, 3.0])
    body = gate_body(keys, deltas, boundary, hardness, "all", kinds)
    activation = torch.stack([keys[0], keys[1], keys[2], torch.zeros(16)])[None]
    out = body(activation.clone(), InjectionContext())
    added = (out - activation)[0, :, :3]
    expected = gate_values(activation, keys, boundary, hardness, kinds)[0]
    assert torch.allclose(added, expected)
    # Each key opens its own memory's gate fully.
    for i in range(3):
        assert float(added[i, i]) == pytest.approx(1.0, abs=1e-5)
    # The zero activation: the cosine gate and the distance gate stay shut (cos = 0,
    # distance 1 ≥ r); the projection gate has x = 1 there.
    assert float(added[3, 1]) == 0.0 and float(added[3, 2]) == 0.0
