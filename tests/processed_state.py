"""The processed tensors of a plain model as TransformerBridge's processed model holds
them, for the parity tests (tests/integration/test_processing.py and the realmodel
tier): an RMSNorm model leaves its gains unfolded and computes its processed
unembedding when read (meminject.processing.process_in_place), so a copy gets those
deferred folds (meminject.processing.fold_deferred) before its tensors are compared."""

from __future__ import annotations

import copy
from typing import Any

from meminject.processing import Family, LazyUnembedding, fold_deferred


def processed_state(plain: Any, family: Family, unembedding: LazyUnembedding | None) -> dict:
    if unembedding is None:
        return dict(plain.state_dict())
    folded = copy.deepcopy(plain)
    fold_deferred(folded, family, unembedding)
    return dict(folded.state_dict())
