"""Processed coordinates without TransformerLens: the weight processing of the paper's
``HookedTransformer`` (and of TransformerBridge's compatibility mode), applied in place
to a plain Hugging Face model, one block at a time.

What processing does, in the order TransformerLens applies it (docs/architecture.md,
"Coordinates"):

1. **Fold each norm into the weights that read it.** A LayerNorm's gain ``w`` and bias
   ``b`` move into the next linear map ``x ↦ W x + B``: ``B ← B + W b``, ``W ← W·diag(w)``,
   then ``W`` is centred over its input (``d_model``) axis, since a LayerNorm's output
   has zero mean; the norm keeps only its normalisation (``w = 1``, ``b = 0``). An
   RMSNorm folds its gain only, uncentred; Gemma's RMSNorm multiplies by ``1 + w``, so
   it folds ``1 + w`` and keeps ``w = 0``. The final norm folds into the unembedding.
2. **Centre the writing weights** (LayerNorm models only): the token and position
   embeddings and every map that writes the residual stream (attention output, MLP
   output, their biases) lose their mean over ``d_model``, which no LayerNorm sees.
3. **Centre the unembedding** over the vocabulary (softmax ignores a shared shift),
   unless logits are soft-capped; the unembedding gets a bias (zero when it had none).
4. **Fold the value biases** into the attention output's bias: ``b_O ← b_O + W_O b_V``,
   ``b_V ← 0`` (grouped key/value heads repeated to the query heads first), then the
   bias is centred again in LayerNorm models.

**RMSNorm families fold lazily** (Llama, SmolLM2, Mistral, Qwen2, Gemma). Folding an
RMSNorm's gain into the weights that read it changes no activation meminject reads or
writes — every site (the residual stream, attention and MLP outputs, the value mix, the
MLP's hidden activation) is the same number before and after — so the model keeps its
gains where they are, and only what a site or an encoder does see is processed: the
value biases (they move from ``hook_z`` into the output bias) and the unembedding.
The unembedding stays the raw ``lm_head`` (tied to the embedding where it was: 262k ×
640 in Gemma 3, a second copy would be 168M parameters) and the final norm keeps its
gain; the forward pass then gives the processed logits plus one constant per position
(the centring's shift, which softmax ignores), and the processed ``W_U`` is a
:class:`LazyUnembedding`, computed column by column when an encoder reads it. Nothing
else is written, so the checkpoint's pages are never copied on write: loading a 1B
model costs what reading it costs. LayerNorm families (GPT-2) are processed in full;
their tied embedding is untied, because the embedding is centred over ``d_model`` and
the unembedding is not. Everything is computed in float32 and written back in the
model's dtype, a block at a time. The families are a table
(:data:`FAMILIES`), keyed by the configuration's ``model_type``; tests hold the result
to TransformerBridge's processed tensors for each (the deferred folds applied to a copy
for the comparison: tests/processed_state.py) and every site's activation to the
bridge's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float
    from torch import Tensor

#: How a family's norms compute: ``layer`` (gain and bias, centring), ``rms`` (gain),
#: ``rms_offset`` (Gemma: ``x·(1 + w)``).
NormKind = Literal["layer", "rms", "rms_offset"]


@dataclass(frozen=True)
class Family:
    """Where a family's plain Hugging Face model keeps what processing reads and writes
    (module paths; those inside a block are relative to it)."""

    norm: NormKind
    embed: str
    blocks: str
    ln1: str
    #: The modules reading ``ln1`` (the attention's input projections).
    attn_in: tuple[str, ...]
    attn_out: str
    #: The norm the MLP reads through, and the modules reading it.
    ln2: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    final_norm: str
    lm_head: str = "lm_head"
    pos_embed: str | None = None
    #: Gemma 2/3's norms on the attention and MLP outputs (before the residual add).
    ln1_post: str | None = None
    ln2_post: str | None = None
    #: Where the value bias sits in the attention's input projections: ``split`` (the
    #: last of ``attn_in``), ``qkv`` ([q | k | v] in one fused projection) or
    #: ``heads_qkv`` (per head [q; k; v], GPT-NeoX).
    value_bias: Literal["split", "qkv", "heads_qkv"] = "split"


_LLAMA = Family(
    norm="rms",
    embed="model.embed_tokens",
    blocks="model.layers",
    ln1="input_layernorm",
    attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out="self_attn.o_proj",
    ln2="post_attention_layernorm",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
)

_GEMMA = dataclasses.replace(
    _LLAMA,
    norm="rms_offset",
    ln2="pre_feedforward_layernorm",
    ln1_post="post_attention_layernorm",
    ln2_post="post_feedforward_layernorm",
)

#: The supported families by ``model_type``. Others load through TransformerBridge.
FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        norm="layer",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        blocks="transformer.h",
        ln1="ln_1",
        attn_in=("attn.c_attn",),
        attn_out="attn.c_proj",
        ln2="ln_2",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        value_bias="qkv",
    ),
    "gpt_neox": Family(
        norm="layer",
        embed="gpt_neox.embed_in",
        blocks="gpt_neox.layers",
        ln1="input_layernorm",
        attn_in=("attention.query_key_value",),
        attn_out="attention.dense",
        ln2="post_attention_layernorm",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        value_bias="heads_qkv",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
}


def family_of(config: Any) -> Family | None:
    """The processing family of a model's configuration, or None when unsupported."""
    return FAMILIES.get(str(getattr(config, "model_type", "")))


@dataclass(frozen=True)
class LazyUnembedding:
    """The processed unembedding of an RMSNorm model whose ``lm_head`` holds the raw
    (possibly tied) weights: ``W_U[:, t] = g ⊙ U[t] − c``, with ``U`` the ``lm_head``
    weight, ``g`` the final norm's gain (left in the norm) and ``c = g ⊙ mean_t U[t]`` the
    vocabulary centring (absent when logits are soft-capped). Columns are computed when
    read, in float32, so no second ``d_vocab × d_model`` matrix exists unless the whole
    one is asked for."""

    gain: Tensor
    centre: Tensor | None

    def columns(
        self, lm_head: Float[Tensor, "d_vocab d_model"], tokens: list[int]
    ) -> Float[Tensor, "d_model n"]:
        """The processed unembedding's columns for ``tokens``, in float32."""
        cols = lm_head[tokens].float().T * self.gain[:, None]
        return cols if self.centre is None else cols - self.centre[:, None]

    def matrix(self, lm_head: Float[Tensor, "d_vocab d_model"]) -> Float[Tensor, "d_model d_vocab"]:
        """The whole processed unembedding, in ``lm_head``'s dtype (a full copy)."""
        w_u = lm_head.T.to(dtype=lm_head.dtype, copy=True)
        for start in range(0, w_u.shape[1], _CHUNK):
            part = w_u[:, start : start + _CHUNK]
            part.copy_(self.columns(lm_head, list(range(start, start + part.shape[1]))))
        return w_u


#: Rows of the vocabulary handled at once where a float32 copy of the whole matrix
#: would be the largest tensor in the process.
_CHUNK = 16384


def process_in_place(model: Any, family: Family) -> LazyUnembedding | None:
    """Put ``model`` (a plain ``AutoModelForCausalLM``) in processed coordinates, in
    place (see the module's docstring). Returns the processed unembedding of an RMSNorm
    model (its ``lm_head`` keeps the raw weights); None for a LayerNorm model, whose
    ``lm_head`` holds the processed unembedding itself."""
    import torch

    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    modules = dict(model.named_modules())
    blocks = list(modules[family.blocks])
    embed, lm_head = modules[family.embed], modules[family.lm_head]
    with torch.no_grad():
        if family.norm != "layer":
            for block in blocks:
                _fold_value_bias(family, config, dict(block.named_modules()))
            return _lazy_unembedding(family, modules[family.final_norm], lm_head, softcap)
        if _shares_weight(embed, lm_head):
            _untie(model, embed, lm_head)
        for block in blocks:
            inner = dict(block.named_modules())
            _fold_norm(family, inner[family.ln1], [inner[n] for n in family.attn_in])
            _fold_norm(family, inner[family.ln2], [inner[n] for n in family.mlp_in])
        _fold_norm(family, modules[family.final_norm], [lm_head])
        _centre_rows(embed)
        if family.pos_embed is not None:
            _centre_rows(modules[family.pos_embed])
        for block in blocks:
            inner = dict(block.named_modules())
            for name in (family.attn_out, family.mlp_out):
                _centre_output(family, inner[name])
        _centre_unembedding(lm_head, centre=not softcap)
        for block in blocks:
            _fold_value_bias(family, config, dict(block.named_modules()))
    return None


def fold_deferred(model: Any, family: Family, unembedding: LazyUnembedding | None) -> None:
    """Apply to ``model`` what :func:`process_in_place` leaves out of an RMSNorm model —
    each norm's gain folded into its readers, and the lazy unembedding written into an
    untied ``lm_head`` with a zero bias — which gives TransformerBridge's processed
    tensors exactly. Nothing meminject runs needs it (no site sees the difference); the
    parity tests compare tensors through it."""
    import torch

    if unembedding is None:
        return
    modules = dict(model.named_modules())
    with torch.no_grad():
        for block in modules[family.blocks]:
            inner = dict(block.named_modules())
            _fold_norm(family, inner[family.ln1], [inner[n] for n in family.attn_in])
            _fold_norm(family, inner[family.ln2], [inner[n] for n in family.mlp_in])
        lm_head = modules[family.lm_head]
        w_u = unembedding.matrix(lm_head.weight)
        lm_head.weight = torch.nn.Parameter(w_u.T.contiguous(), requires_grad=False)
        model.config.tie_word_embeddings = False
        _bias(lm_head, w_u.shape[1])
        modules[family.final_norm].weight.fill_(0.0 if family.norm == "rms_offset" else 1.0)


def _centre_unembedding(lm_head: Any, *, centre: bool) -> None:
    """Centre the unembedding over the vocabulary (weight and a bias it gains), unless
    logits are soft-capped (the cap is not shift-invariant)."""
    if centre:
        with _float32(lm_head.weight) as w_u:
            w_u -= w_u.mean(dim=0, keepdim=True)
    bias = _bias(lm_head, lm_head.weight.shape[0])
    if centre:
        with _float32(bias) as b_u:
            b_u -= b_u.mean()


def _lazy_unembedding(
    family: Family, final_norm: Any, lm_head: Any, softcap: object
) -> LazyUnembedding:
    """The processed unembedding of an RMSNorm model: the final norm's gain, and the
    centring term computed a chunk of the vocabulary at a time (no float32 copy of the
    whole matrix)."""
    import torch

    gain = final_norm.weight.detach().float().clone()
    if family.norm == "rms_offset":
        gain = gain + 1.0
    if softcap:
        return LazyUnembedding(gain=gain, centre=None)
    u = lm_head.weight.detach()
    total = torch.zeros(u.shape[1], dtype=torch.float32, device=u.device)
    for start in range(0, u.shape[0], _CHUNK):
        total += u[start : start + _CHUNK].float().sum(dim=0)
    return LazyUnembedding(gain=gain, centre=gain * (total / u.shape[0]))


@contextmanager
def _float32(tensor: Tensor) -> Iterator[Tensor]:
    """``tensor`` as float32 for the body to change in place; written back after."""
    work = tensor.detach().float().clone()
    yield work
    tensor.copy_(work.to(tensor.dtype))


def _conv1d(module: Any) -> bool:
    """GPT-2's ``Conv1D`` stores ``[in, out]`` weights; ``nn.Linear`` stores ``[out, in]``."""
    return type(module).__name__ == "Conv1D"


def _weight_in_out(module: Any) -> Tensor:
    """A projection's weight as ``[in, out]`` (float32 copy)."""
    w = module.weight.detach().float()
    return w if _conv1d(module) else w.T


def _set_weight_in_out(module: Any, w: Tensor) -> None:
    module.weight.copy_((w if _conv1d(module) else w.T).to(module.weight.dtype))


def _bias(module: Any, size: int) -> torch.nn.Parameter:
    """The module's bias, made (zeros, in its weight's dtype) when it has none."""
    import torch

    if getattr(module, "bias", None) is None:
        weight = module.weight
        module.bias = torch.nn.Parameter(
            torch.zeros(size, dtype=weight.dtype, device=weight.device), requires_grad=False
        )
    bias: torch.nn.Parameter = module.bias
    return bias


def _fold_norm(family: Family, norm: Any, readers: list[Any]) -> None:
    """Fold ``norm``'s gain (and bias) into the modules that read its output."""
    gain = norm.weight.detach().float()
    if family.norm == "rms_offset":
        gain = gain + 1.0
    shift = getattr(norm, "bias", None)
    for reader in readers:
        w = _weight_in_out(reader)  # [d_model, out]
        if family.norm == "layer" and shift is not None:
            b = _bias(reader, w.shape[1])
            with _float32(b) as b32:
                b32 += shift.detach().float() @ w
        w = w * gain[:, None]
        if family.norm == "layer":
            w = w - w.mean(dim=0, keepdim=True)
        _set_weight_in_out(reader, w)
    norm.weight.fill_(0.0 if family.norm == "rms_offset" else 1.0)
    if shift is not None:
        shift.zero_()


def _centre_rows(embedding: Any) -> None:
    with _float32(embedding.weight) as w:
        w -= w.mean(dim=1, keepdim=True)


def _centre_output(family: Family, module: Any) -> None:
    """A map writing the residual stream loses its mean over ``d_model`` (weight and
    bias)."""
    w = _weight_in_out(module)  # [in, d_model]
    _set_weight_in_out(module, w - w.mean(dim=1, keepdim=True))
    if getattr(module, "bias", None) is not None:
        with _float32(module.bias) as b:
            b -= b.mean()


def _fold_value_bias(family: Family, config: Any, inner: dict[str, Any]) -> None:
    """``b_O ← b_O + W_O b_V`` and ``b_V ← 0``; b_O centred again for LayerNorm models."""
    n_heads = int(config.num_attention_heads)
    fused = inner[family.attn_in[-1]]
    bias = getattr(fused, "bias", None)
    if bias is None:
        return
    out = inner[family.attn_out]
    w_o = _weight_in_out(out)  # [n_heads·d_head, d_model]
    d_in = w_o.shape[0]
    d_head = d_in // n_heads
    b = bias.detach().float()
    if family.value_bias == "qkv":
        b_v = b[2 * d_in :]
    elif family.value_bias == "heads_qkv":
        b_v = b.reshape(n_heads, 3, d_head)[:, 2, :].reshape(-1)
    else:
        b_v = b
        n_kv = b_v.shape[0] // d_head
        if n_kv != n_heads:  # grouped key/value heads: each serves n_heads / n_kv queries
            b_v = b_v.reshape(n_kv, d_head).repeat_interleave(n_heads // n_kv, dim=0)
            b_v = b_v.reshape(-1)
    b_o = _bias(out, w_o.shape[1])
    with _float32(b_o) as b_o32:
        b_o32 += b_v @ w_o
        if family.norm == "layer":
            b_o32 -= b_o32.mean()
    with _float32(bias) as b32:
        if family.value_bias == "qkv":
            b32[2 * d_in :] = 0.0
        elif family.value_bias == "heads_qkv":
            b32.view(n_heads, 3, d_head)[:, 2, :] = 0.0
        else:
            b32.zero_()


def _shares_weight(embed: Any, lm_head: Any) -> bool:
    return bool(
        lm_head.weight is embed.weight or lm_head.weight.data_ptr() == embed.weight.data_ptr()
    )


def _untie(model: Any, embed: Any, lm_head: Any) -> None:
    """Give the unembedding its own tensor (a LayerNorm model's embedding is centred
    over ``d_model`` and its unembedding is not)."""
    import torch

    lm_head.weight = torch.nn.Parameter(lm_head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
