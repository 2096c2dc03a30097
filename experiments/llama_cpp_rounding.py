"""How far llama.cpp's arithmetic moves SmolLM2's log-probabilities: the tolerance of the
llamacpp test tier (tests/llamacpp_tier), measured.

llama.cpp runs the Q4_1 GGUF with its weights as stored (meminject's dequantized copy
holds the same values), but it rounds each matrix product's input activations to 8 bits
in blocks of 32 (Q8_1 for the Q4_1 layers, Q8_0 for the Q8_0 token embedding, one fp16
scale per block) and keeps keys and values in an fp16 cache. This script imitates that
rounding in PyTorch on the dequantized checkpoint and reports, for the tier's prompts
with and without its control vector, (1) the largest change of a top-5 token's
log-probability along meminject's greedy continuation and (2) the greedy continuation
under the imitation. It needs no llama.cpp.

    python experiments/llama_cpp_rounding.py

Writes ``experiments/results/llama_cpp_rounding.md``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
N_TOKENS = 10


def rounded_q8(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as llama.cpp's Q8 blocks hold it: 32 values, one fp16 scale."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // 32, 32)
    scale = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.round(blocks / scale.clamp_min(1e-30)).clamp(-127, 127)
    return (q * scale).reshape(shape)


def main() -> None:
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meminject import model_sources
    from meminject.cli import cli
    from meminject.export_llama_cpp import read_control_vector
    from meminject.gguf_cache import cached_dir_for

    sys.path.insert(0, str(ROOT))  # the tier's prompts and memory
    from tests.llamacpp_tier.test_llamacpp_control_vector import KATHMANDU, PROMPTS

    torch.set_num_threads(1)
    directory = cached_dir_for(model_sources.SMOLLM2.gguf_path())
    tok = AutoTokenizer.from_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as scratch:
        memory = Path(scratch) / "kathmandu.toml"
        memory.write_text(KATHMANDU)
        out = Path(scratch) / "kathmandu.gguf"
        result = CliRunner().invoke(cli, ["export", str(memory), "-o", str(out)])
        assert result.exit_code == 0, result.output
        _, vectors = read_control_vector(out)

    rounding: list = []

    def imitate(on: bool) -> None:
        while rounding:
            rounding.pop().remove()
        if not on:
            return
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear):
                rounding.append(module.register_forward_pre_hook(lambda m, a: (rounded_q8(a[0]),)))
            if name.endswith(("k_proj", "v_proj")):
                rounding.append(module.register_forward_hook(lambda m, a, o: o.half().float()))

    def log_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([ids]), use_cache=False).logits[0]
        return torch.log_softmax(logits.double(), -1)

    def greedy(prompt_ids: list[int]) -> list[int]:
        ids = list(prompt_ids)
        for _ in range(N_TOKENS):
            token = int(log_probs(ids)[-1].argmax())
            if token == tok.eos_token_id:
                break
            ids.append(token)
        return ids

    rows = []
    worst = 0.0
    for with_vector in (False, True):
        added = []
        if with_vector:
            for block, direction in vectors.items():
                vector = torch.as_tensor(direction)

                def add(module, args, output, vector=vector):
                    if isinstance(output, tuple):
                        return (output[0] + vector, *output[1:])
                    return output + vector

                added.append(hf.model.layers[block].register_forward_hook(add))
        for prompt in PROMPTS:
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            imitate(False)
            ids = greedy(prompt_ids)
            exact = log_probs(ids)
            imitate(True)
            rounded = log_probs(ids)
            imitated = tok.decode(greedy(prompt_ids)[len(prompt_ids) :])
            imitate(False)
            shift = 0.0
            for at in range(len(prompt_ids) - 1, len(ids) - 1):
                top = exact[at].topk(5).indices
                shift = max(shift, float((exact[at, top] - rounded[at, top]).abs().max()))
            worst = max(worst, shift)
            plain = tok.decode(ids[len(prompt_ids) :])
            rows.append((prompt, with_vector, plain, imitated, shift))
            print(f"{prompt!r} {with_vector} {plain!r} {imitated!r} {shift:.3f}", flush=True)
        for handle in added:
            handle.remove()

    lines = [
        "# llama.cpp's rounding, imitated on SmolLM2 (experiments/llama_cpp_rounding.py)",
        "",
        "8-bit activation blocks and fp16 keys and values, on the dequantized checkpoint;",
        f"{N_TOKENS} greedy tokens; the control vector is the llamacpp tier's Kathmandu memory.",
        "",
        "| prompt | control vector | float32 | imitated rounding | max top-5 \\|Δ log p\\| |",
        "| --- | --- | --- | --- | --- |",
    ]
    for prompt, with_vector, plain, imitated, shift in rows:
        shown = plain.replace("\n", "\\n")
        same = "=" if imitated == plain else imitated.replace("\n", "\\n")
        vector_column = "yes" if with_vector else "no"
        lines.append(f"| {prompt} | {vector_column} | {shown} | {same} | {shift:.3f} |")
    changed = sum(imitated != plain for _, _, plain, imitated, _ in rows)
    lines += [
        "",
        f"Largest shift: {worst:.3f} nats; the imitation changes {changed} of {len(rows)} "
        "continuations.",
    ]
    results = HERE / "results" / "llama_cpp_rounding.md"
    results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
