"""Measure what a toyworld model knows, with plain ``transformers``.

Why plain transformers and not TransformerLens: this is the ground truth the rest of the
project (which goes through TransformerLens) is compared against, and it must also work
right after training, before anything else is installed or loaded.

All numbers concern the *first token of the answer* with its leading space (" Kelbrin"),
as in the paper: the prompt ends without a space, so the answer's first token carries it.
Every prompt is preceded by the BOS token, as TransformerLens does by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .world import Example, World


def _load(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    return model, tok


def answer_probs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 256,
) -> tuple[list[float], list[bool]]:
    """Probability of, and top-1 hit for, each answer's first token after its prompt.

    Sequences are right-padded; because attention is causal, the logits at the last real
    token do not see the padding, so no attention mask is needed and results equal
    unbatched ones.
    """
    import torch

    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("toyworld tokenizer must define a BOS token")
    seqs = [[bos, *tokenizer.encode(p, add_special_tokens=False)] for p in prompts]
    targets = [tokenizer.encode(" " + a, add_special_tokens=False)[0] for a in answers]
    probs: list[float] = []
    hits: list[bool] = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), bos, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
            last = torch.tensor([len(s) - 1 for s in chunk])
            mask = torch.ones_like(ids)  # explicit (all ones): silences the padding warning
            logits = model(input_ids=ids, attention_mask=mask).logits
            logits = logits[torch.arange(len(chunk)), last]
            p = torch.softmax(logits.float(), dim=-1)
            tgt = torch.tensor(targets[start : start + batch_size])
            probs.extend(p[torch.arange(len(chunk)), tgt].tolist())
            hits.extend((p.argmax(-1) == tgt).tolist())
    return probs, hits


def _summary(probs: list[float], hits: list[bool]) -> dict[str, float]:
    n = len(probs)
    return {
        "n": n,
        "mean_prob": sum(probs) / n if n else float("nan"),
        "top1": sum(hits) / n if n else float("nan"),
    }


def _examples_summary(model: Any, tok: Any, examples: list[Example]) -> dict[str, float]:
    probs, hits = answer_probs(
        model, tok, [e.prompt for e in examples], [e.answer for e in examples]
    )
    return _summary(probs, hits)


def evaluate(model_dir: str | Path | None = None, world: World | None = None) -> dict[str, Any]:
    """Single-hop and two-hop metrics of the model in ``model_dir`` (default: shipped).

    Returns a dict with sections ``single_hop`` (every fact under every template),
    ``heldout_two_hop`` (the prompts of ``dataset.csv``: bridges never seen in two-hop
    training), ``heldout_explicit`` (the same rows with the bridge named outright, i.e. the
    single-hop counterpart) and ``train_two_hop`` (two-hop sentences that were trained on);
    each holds ``n``, ``mean_prob`` and ``top1`` of the answer's first token.
    """
    from . import WEIGHTS_DIR, load_world

    model_dir = Path(model_dir) if model_dir is not None else WEIGHTS_DIR
    world = world if world is not None else load_world(model_dir / "world.json")
    model, tok = _load(model_dir)
    heldout_rows = world.dataset_rows()
    explicit = answer_probs(
        model,
        tok,
        [r["explicit_sentence"] for r in heldout_rows],
        [r["answer"] for r in heldout_rows],
    )
    return {
        "single_hop": _examples_summary(model, tok, world.single_hop()),
        "heldout_two_hop": _examples_summary(model, tok, world.heldout_two_hop()),
        "heldout_explicit": _summary(*explicit),
        "train_two_hop": _examples_summary(model, tok, world.train_two_hop()),
    }


def format_report(metrics: dict[str, Any]) -> str:
    """A small human-readable table of :func:`evaluate` output."""
    lines = [f"{'set':<18}{'n':>6}{'mean p(answer)':>16}{'top-1':>8}"]
    for name, m in metrics.items():
        if isinstance(m, dict) and "top1" in m:
            lines.append(f"{name:<18}{m['n']:>6}{m['mean_prob']:>16.4f}{m['top1']:>8.3f}")
    return "\n".join(lines)
