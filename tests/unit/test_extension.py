"""Position resolution (InjectionContext): absolute positions, independent of the cache."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from meminject.extension import InjectionContext

MODES = st.one_of(
    st.sampled_from(["all", "prompt", "generated", "last"]),
    st.lists(st.integers(-8, 40), min_size=1, max_size=6, unique=True),
)


def selected(ctx: InjectionContext, positions, seq_len: int) -> set[int]:
    """Absolute positions that the index picks in a forward of seq_len tokens."""
    index = ctx.index(positions, seq_len)
    local = torch.arange(seq_len)
    if index is None:
        return set()
    return {int(p) + ctx.offset for p in local[index].tolist()}


def test_modes_on_a_full_forward() -> None:
    ctx = InjectionContext(prompt_len=5)
    assert selected(ctx, "all", 5) == {0, 1, 2, 3, 4}
    assert selected(ctx, "prompt", 7) == {0, 1, 2, 3, 4}
    assert selected(ctx, "generated", 7) == {5, 6}
    assert selected(ctx, "last", 7) == {4}
    assert selected(ctx, [0, -1, 6, 9], 7) == {0, 4, 6}


@given(
    positions=MODES,
    prompt_len=st.integers(1, 12),
    generated=st.integers(0, 12),
)
def test_cached_steps_select_the_same_positions_as_a_full_forward(
    positions, prompt_len, generated
) -> None:
    """Union over the prompt pass and one-token steps == a full forward over everything."""
    total = prompt_len + generated
    full = InjectionContext(prompt_len=prompt_len)
    expected = selected(full, positions, total)
    stepped = InjectionContext(prompt_len=prompt_len)
    got = selected(stepped, positions, prompt_len)
    for t in range(prompt_len, total):
        stepped.offset = t
        got |= selected(stepped, positions, 1)
    if positions == "all":  # "all" also covers tokens beyond the prompt
        assert expected == set(range(total))
    assert got == expected
