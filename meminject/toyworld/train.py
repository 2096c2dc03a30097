"""Train the toyworld model: ``python -m meminject.toyworld.train [--out DIR] ...``.

Why this script ships with the package: the embedded model's weights are only credible if
anyone can regenerate them. The script is deterministic: the world, corpus, data order and
initialisation all come from ``--seed``; BPE training is deterministic; torch runs with
``use_deterministic_algorithms(True)`` and a fixed thread count. On the same CPU type,
torch version and thread count the resulting ``model.safetensors`` is bit-identical.

Steps: build the world (:mod:`.world`); train a byte-level BPE tokenizer with GPT-2's
leading-space convention on the training corpus; train a ``GPT2LMHeadModel`` on
``<|endoftext|> sentence <|endoftext|>`` sequences (BOS first, because TransformerLens
prepends BOS to prompts); save a Hugging Face directory plus ``world.json``,
``dataset.csv`` (held-out two-hop prompts) and ``train_log.json``; print the evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .world import DEFAULT_N_COUNTRIES, DEFAULT_SEED, World, build_world

SPECIAL = "<|endoftext|>"


@dataclass
class Recipe:
    """Everything that determines the trained model (recorded in ``train_log.json``)."""

    seed: int = DEFAULT_SEED
    n_countries: int = DEFAULT_N_COUNTRIES
    n_continents: int = 6
    vocab_size: int = 1536
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    threads: int = 2
    #: Add :meth:`World.context_mentions` to the corpus (off for the shipped model).
    context_mentions: bool = False

    @classmethod
    def small(cls) -> Recipe:
        """A tiny world and model for tests: trains in seconds."""
        return cls(
            n_countries=8,
            n_continents=3,
            vocab_size=400,
            n_layer=2,
            n_embd=64,
            n_head=2,
            n_positions=64,
            steps=60,
            batch_size=32,
            warmup=10,
        )


def default_out_dir() -> Path:
    from . import WEIGHTS_DIR

    return WEIGHTS_DIR


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    """Byte-level BPE, GPT-2 style: a word's leading space belongs to its token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def save_tokenizer(tok: Any, out: Path, model_max_length: int) -> Any:
    """Save ``tokenizer.json`` + ``tokenizer_config.json`` loadable by ``AutoTokenizer``."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        unk_token=SPECIAL,
        pad_token=SPECIAL,
        model_max_length=model_max_length,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(str(out))
    return hf_tok


# --------------------------------------------------------------------------- training


def _lr_at(step: int, r: Recipe) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio · lr``."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    t = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _batches(n: int, batch_size: int, seed: int) -> Any:
    """Endless stream of index batches: a fresh seeded shuffle each epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def train_model(
    world: World, tok: Any, r: Recipe, log: list[dict[str, float]]
) -> tuple[Any, float]:
    """Train a GPT-2 LM on the world's corpus; returns the model and seconds taken."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(r.seed)
    eot = tok.token_to_id(SPECIAL)
    corpus = world.training_sentences(r.context_mentions)
    seqs = [[eot, *tok.encode(s).ids, eot] for s in corpus]
    longest = max(len(s) for s in seqs)
    if longest > r.n_positions:
        raise ValueError(f"a training sentence has {longest} tokens > n_positions")

    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=r.n_positions,
        n_embd=r.n_embd,
        n_layer=r.n_layer,
        n_head=r.n_head,
        n_inner=4 * r.n_embd,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    model.train()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": r.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=r.lr,
        betas=(0.9, 0.98),
    )
    batches = _batches(len(seqs), min(r.batch_size, len(seqs)), r.seed)
    t0 = time.perf_counter()
    running = 0.0
    every = max(1, r.steps // 15)
    for step in range(r.steps):
        idx = next(batches)
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), eot, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            s = torch.tensor(seqs[i])
            ids[row, : len(s)] = s
            labels[row, : len(s)] = s
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, r)
        # Right padding needs no attention mask: causal attention never looks ahead.
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % every == 0 or step + 1 == r.steps:
            n = (step % every) + 1
            avg = running / n
            running = 0.0
            elapsed = time.perf_counter() - t0
            log.append({"step": step + 1, "loss": round(avg, 5), "seconds": round(elapsed, 1)})
            print(f"step {step + 1:>5}/{r.steps}  loss {avg:.4f}  {elapsed:6.1f}s", flush=True)
    model.eval()
    return model, time.perf_counter() - t0


# --------------------------------------------------------------------------- main


def run(out: Path, r: Recipe) -> dict[str, Any]:
    """Build, train, save and evaluate; returns the evaluation metrics."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    # Keep the log readable: no per-file progress bars, no padding advice (right padding
    # under causal attention is exact here, see train_model).
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    torch.set_num_threads(r.threads)
    torch.use_deterministic_algorithms(True)

    t_start = time.perf_counter()
    world = build_world(r.seed, r.n_countries, r.n_continents)
    corpus = world.training_sentences(r.context_mentions)
    print(
        f"world: {len(world.entities)} entities, {len(corpus)} training sentences "
        f"({len(world.single_hop())} single-hop, {len(world.train_two_hop())} two-hop"
        + (f", {len(world.context_mentions())} context mentions" if r.context_mentions else "")
        + "), "
        f"{len(world.heldout_two_hop())} held-out two-hop prompts",
        flush=True,
    )
    tok = train_tokenizer(corpus, r.vocab_size)
    n_single = sum(len(tok.encode(" " + e).ids) == 1 for e in world.entities)
    print(
        f"tokenizer: vocab {tok.get_vocab_size()}, {n_single}/{len(world.entities)} "
        "entity names are one token",
        flush=True,
    )

    out.mkdir(parents=True, exist_ok=True)
    log: list[dict[str, float]] = []
    model, train_seconds = train_model(world, tok, r, log)
    model.save_pretrained(str(out))
    save_tokenizer(tok, out, r.n_positions)
    (out / "world.json").write_text(world.to_json(), encoding="utf-8")
    (out / "dataset.csv").write_text(world.dataset_csv(), encoding="utf-8")
    # transformers writes the safetensors file through a private temporary file (mode
    # 0600); make every shipped file world-readable so an installed package can load it.
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)

    from .metrics import evaluate, format_report

    metrics = evaluate(out, world)
    total = time.perf_counter() - t_start
    print(format_report(metrics), flush=True)
    print(f"training {train_seconds:.1f}s, total {total:.1f}s", flush=True)
    info = {
        "command": "python -m meminject.toyworld.train " + " ".join(sys.argv[1:]),
        "recipe": asdict(r),
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total, 1),
        "loss": log,
        "metrics": metrics,
    }
    (out / "train_log.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m meminject.toyworld.train",
        description="Train the toyworld model deterministically and save it as a "
        "Hugging Face directory.",
    )
    p.add_argument("--out", type=Path, default=None, help="output directory (default: shipped)")
    p.add_argument("--small", action="store_true", help="tiny world and model (for tests)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--seed", type=int, default=None, help="world, data order and init seed")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    p.add_argument(
        "--context-mentions",
        action="store_true",
        default=None,
        help="also train on 'Sholand. The capital of the country is Zaraholm.' sentences",
    )
    args = p.parse_args(argv)
    r = Recipe.small() if args.small else Recipe()
    for name in ("steps", "seed", "lr", "batch_size", "threads", "context_mentions"):
        value = getattr(args, name)
        if value is not None:
            setattr(r, name, value)
    run(args.out or default_out_dir(), r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
