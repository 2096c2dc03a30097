"""The processed tensors of a plain model as TransformerBridge's processed model holds
them, for the parity tests (tests/integration/test_processing.py and the realmodel
tier): a tied RMSNorm model keeps its tie and computes its processed unembedding when
read (meminject.processing.TiedUnembedding), so that is written out here under the
names the bridge's plain twin uses — the folded final norm, the unembedding and its
(zero) bias."""

from __future__ import annotations

from typing import Any

import torch

from meminject.processing import Family, TiedUnembedding


def processed_state(plain: Any, family: Family, unembedding: TiedUnembedding | None) -> dict:
    state = dict(plain.state_dict())
    if unembedding is None:
        return state
    embedding = plain.get_input_embeddings().weight
    assert plain.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    w_u = unembedding.matrix(embedding)
    state["lm_head.weight"] = w_u.T
    state["lm_head.bias"] = torch.zeros(w_u.shape[1], dtype=w_u.dtype)
    final_norm = f"{family.final_norm}.weight"
    folded = 0.0 if family.norm == "rms_offset" else 1.0
    state[final_norm] = torch.full_like(state[final_norm], folded)
    return state
