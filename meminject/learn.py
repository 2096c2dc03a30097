"""Learning gradient-derived local memories (DESIGN §5), and choosing their gate boundary.

For a prompt and a target, the activation ``a`` at one site (layer ℓ, one position)
is the memory's key, and the delta is found by gradient steps on the cross-entropy
of the target taken with respect to ``a``: ``Δ ← Δ − α·∂loss/∂a``. One step is the
blog's recipe; several smaller steps follow the loss surface further. With no α
given, the smallest α that makes the target top-1 is found by doubling and then
bisection.

The boundary is chosen on examples: prompts that must produce the target
(positives) and prompts that must not (negatives). Each grid boundary is scored
by accuracy over both sets with the exact hook body the ``gated`` strategy uses.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.engine import bridge_fwd_hooks
from meminject.errors import BadInputError
from meminject.schema import SITE_HOOKS

if TYPE_CHECKING:
    from torch import Tensor

    from meminject.models import LoadedModel

LEARN_SITES = ("attn_z", "attn_out", "mlp_post", "mlp_out", "resid_pre", "resid_mid", "resid_post")
DEFAULT_GRID = tuple(round(0.05 * i, 4) for i in range(1, 41))  # 0.05 … 2.0
DEFAULT_HARDNESS = 3.0


@dataclass(frozen=True)
class LearnedMemory:
    """Key and delta for one site, and how they were found."""

    prompt: str
    target: str
    target_ids: list[int]
    layer: int
    site: str
    position: int  # absolute position in the prompt (BOS counts as 0)
    key: Tensor
    delta: Tensor
    alpha: float
    steps: int
    teacher_force: bool
    prob_before: float  # of the target's first token at the prompt's end
    prob_after: float  # the same with the full delta at the key's position

    def provenance(self) -> dict[str, str]:
        return {
            "prompt": self.prompt,
            "target": self.target,
            "layer": str(self.layer),
            "site": self.site,
            "position": str(self.position),
            "alpha": repr(self.alpha),
            "steps": str(self.steps),
            "teacher_force": str(self.teacher_force).lower(),
        }


def target_tokens(model: LoadedModel, target: str) -> list[int]:
    """The target as it continues a prompt: a leading space is added unless the target
    already starts with whitespace (GPT-2-style tokenizers mark word starts with it)."""
    if not target.strip():
        raise BadInputError("the target is empty")
    text = target if target[:1].isspace() else " " + target
    ids = model.tokenize(text, prepend_bos=False)
    if not ids:
        raise BadInputError(f"the target {target!r} encodes to no tokens")
    return ids


class _Objective:
    """Cross-entropy of the target as a function of the delta added at one activation."""

    def __init__(
        self,
        model: LoadedModel,
        prompt: str,
        target_ids: list[int],
        layer: int,
        site: str,
        position: int,
        teacher_force: bool,
    ):
        import torch

        if site not in LEARN_SITES:
            raise BadInputError(f"unknown site '{site}'; choose one of {', '.join(LEARN_SITES)}")
        if not 0 <= layer < model.dims.n_layers:
            raise BadInputError(
                f"layer {layer} is out of range; the model has {model.dims.n_layers} layers"
            )
        self.model = model
        prompt_tokens = model.to_tokens(prompt)
        prompt_len = prompt_tokens.shape[1]
        absolute = position + prompt_len if position < 0 else position
        if not 0 <= absolute < prompt_len:
            raise BadInputError(f"position {position} is outside the prompt of {prompt_len} tokens")
        self.position = absolute
        self.prompt_len = prompt_len
        used = target_ids if teacher_force else target_ids[:1]
        extra = torch.tensor([used[:-1]], dtype=torch.long, device=model.device)
        self.tokens = torch.cat([prompt_tokens, extra], dim=1)
        if self.tokens.shape[1] > model.dims.n_ctx:
            raise BadInputError("the prompt and target are longer than the model's context")
        self.targets = torch.tensor(used, dtype=torch.long, device=model.device)
        self.rows = torch.arange(prompt_len - 1, prompt_len - 1 + len(used), device=model.device)
        self.hook_name = SITE_HOOKS[site].format(layer=layer)
        self.shape = model.site_shape(site)
        self.key: Tensor | None = None

    def logits(self, delta: Tensor | None) -> Tensor:
        """Logits at the target rows with ``delta`` added at the key's position."""
        position = self.position

        def add(activation: Tensor, hook: Any) -> Tensor:
            if self.key is None:
                self.key = activation[0, position].detach().clone()
            if delta is None:
                return activation
            out = activation.clone()
            out[:, position] = out[:, position] + delta.to(activation.dtype)
            return out

        hooks: Any = bridge_fwd_hooks(self.model, [(self.hook_name, add)])
        logits = self.model.bridge.run_with_hooks(self.tokens, fwd_hooks=hooks)
        return logits[0, self.rows].float()

    def loss_and_grad(self, delta: Tensor) -> tuple[float, Tensor]:
        import torch

        delta = delta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.logits(delta)
            loss = torch.nn.functional.cross_entropy(logits, self.targets, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
        return float(loss.detach()), grad.detach()

    def is_top1(self, delta: Tensor) -> bool:
        import torch

        with torch.no_grad():
            return bool((self.logits(delta).argmax(-1) == self.targets).all())

    def first_prob(self, delta: Tensor | None) -> float:
        import torch

        with torch.no_grad():
            return float(self.logits(delta)[0].softmax(-1)[self.targets[0]])


def _descend(objective: _Objective, alpha: float, steps: int) -> Tensor:
    import torch

    delta = torch.zeros(objective.shape, device=objective.model.device, dtype=torch.float32)
    for _ in range(steps):
        _, grad = objective.loss_and_grad(delta)
        delta = delta - alpha * grad.float()
    return delta


def learn(
    model: LoadedModel,
    prompt: str,
    target: str,
    *,
    layer: int,
    site: str,
    position: int = -1,
    alpha: float | None = None,
    steps: int = 1,
    teacher_force: bool = False,
    max_doublings: int = 40,
    bisections: int = 10,
) -> LearnedMemory:
    """Learn the key and delta that make ``prompt`` continue with ``target``."""
    if steps < 1:
        raise BadInputError("steps must be at least 1")
    if alpha is not None and not alpha > 0:
        raise BadInputError("alpha must be positive")
    ids = target_tokens(model, target)
    objective = _Objective(model, prompt, ids, layer, site, position, teacher_force)
    prob_before = objective.first_prob(None)
    if alpha is None:
        alpha = _smallest_alpha(objective, steps, max_doublings, bisections)
    delta = _descend(objective, alpha, steps)
    assert objective.key is not None
    return LearnedMemory(
        prompt=prompt,
        target=target,
        target_ids=ids,
        layer=layer,
        site=site,
        position=objective.position,
        key=objective.key.float().cpu(),
        delta=delta.cpu(),
        alpha=alpha,
        steps=steps,
        teacher_force=teacher_force,
        prob_before=prob_before,
        prob_after=objective.first_prob(delta),
    )


def _smallest_alpha(
    objective: _Objective, steps: int, max_doublings: int, bisections: int
) -> float:
    """Smallest α (to bisection precision) whose descent makes the target top-1."""
    loss, grad = objective.loss_and_grad(_zero(objective))
    norm_sq = float((grad.float() ** 2).sum())
    if norm_sq == 0.0:
        raise BadInputError("the loss does not depend on this activation (zero gradient)")

    def works(alpha: float) -> bool:
        return objective.is_top1(_descend(objective, alpha, steps))

    # Start where a linearised loss would reach zero (α = loss/‖g‖²), then walk by
    # factors of two until the answer flips, then bisect the bracket.
    guess = max(loss, 1e-6) / norm_sq
    if works(guess):
        low, high = 0.0, guess
        for _ in range(max_doublings):
            if not works(high / 2):
                low = high / 2
                break
            high /= 2
    else:
        low, high = guess, guess * 2
        for _ in range(max_doublings):
            if works(high):
                break
            low, high = high, high * 2
        else:
            raise BadInputError(
                f"no step size up to {high:.3g} makes the target top-1 at this site and layer"
            )
    for _ in range(bisections):
        middle = (low + high) / 2
        if works(middle):
            high = middle
        else:
            low = middle
    return high


def _zero(objective: _Objective) -> Tensor:
    import torch

    return torch.zeros(objective.shape, device=objective.model.device, dtype=torch.float32)


# --- boundary search ------------------------------------------------------------------


@dataclass(frozen=True)
class BoundaryRow:
    boundary: float
    positives_ok: int
    negatives_ok: int
    accuracy: float


@dataclass(frozen=True)
class BoundaryChoice:
    boundary: float
    accuracy: float
    table: list[BoundaryRow] = field(default_factory=list)
    n_positives: int = 0
    n_negatives: int = 0


def read_prompts(path: Path | str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read: {exc}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise BadInputError(f"{path}: holds no prompts")
    return prompts


def gated_top1(
    model: LoadedModel,
    learned: LearnedMemory,
    prompts: Sequence[str],
    boundary: float,
    hardness: float,
) -> list[int]:
    """Top-1 next token of each prompt with the memory applied at every position, through
    the same hook body as the ``gated`` strategy."""
    import torch

    from meminject.engine import CompiledHook, inject
    from meminject.extension import InjectionContext, SiteHook
    from meminject.strategies import gate_body

    device = model.device
    body = gate_body(
        learned.key.flatten()[None].to(device),
        learned.delta.flatten()[None].to(device),
        torch.tensor([boundary], device=device),
        torch.tensor([hardness], device=device),
        "all",
    )
    hook = CompiledHook(
        SiteHook(SITE_HOOKS[learned.site].format(layer=learned.layer), body),
        "gated",
        "meminject.learn",
    )
    # Right padding is exact for a causal model with absolute positions: real tokens
    # never attend to the pads after them, so one batch replaces one forward per prompt.
    rows = [model.tokenize(p) for p in prompts]
    lengths = torch.tensor([len(r) for r in rows], device=device)
    pad = int(model.tokenizer.eos_token_id or 0)
    batch = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    with torch.no_grad(), inject(model, [hook], context=InjectionContext()):
        logits = model.bridge(batch)
    last = logits[torch.arange(len(rows), device=device), lengths - 1]
    return [int(t) for t in last.argmax(-1).tolist()]


def search_boundary(
    model: LoadedModel,
    learned: LearnedMemory,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    hardness: float = DEFAULT_HARDNESS,
    grid: Sequence[float] = DEFAULT_GRID,
) -> BoundaryChoice:
    """Score every grid boundary by accuracy (positives whose top-1 is the target plus
    negatives whose top-1 is not, over both sets); choose the best, and among ties the
    centre of the widest run of best boundaries."""
    if not positives and not negatives:
        raise BadInputError("boundary search needs positive or negative prompts")
    grid = sorted(set(grid))
    if not grid or grid[0] <= 0:
        raise BadInputError("boundaries must be positive")
    target = learned.target_ids[0]
    table = []
    for b in grid:
        top = gated_top1(model, learned, [*positives, *negatives], b, hardness)
        pos_ok = sum(t == target for t in top[: len(positives)])
        neg_ok = sum(t != target for t in top[len(positives) :])
        table.append(BoundaryRow(b, pos_ok, neg_ok, (pos_ok + neg_ok) / len(top)))
    centre, best = choose_boundary(table)
    return BoundaryChoice(centre, best, table, len(positives), len(negatives))


def choose_boundary(table: Sequence[BoundaryRow]) -> tuple[float, float]:
    """The best accuracy, and the centre of the widest run of consecutive grid boundaries
    that reach it (a boundary in the middle of a plateau is the least fragile choice)."""
    best = max(row.accuracy for row in table)
    runs: list[list[BoundaryRow]] = []
    previous_best = False
    for row in table:
        is_best = row.accuracy == best
        if is_best and previous_best:
            runs[-1].append(row)
        elif is_best:
            runs.append([row])
        previous_best = is_best
    widest = max(runs, key=lambda run: run[-1].boundary - run[0].boundary)
    return round((widest[0].boundary + widest[-1].boundary) / 2, 6), best


# --- writing ----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def _table(lines: list[str], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "memory"


def write_learned(
    out: Path | str,
    learned: LearnedMemory,
    model: LoadedModel,
    *,
    name: str,
    boundary: float,
    hardness: float,
    append: bool = False,
    force: bool = False,
    choice: BoundaryChoice | None = None,
) -> tuple[Path, Path]:
    """Write the tensors, then the TOML, each atomically; returns both paths.

    The tensor file's name carries a hash of its contents, so it never overwrites a
    file that an existing TOML points at: a crash between the two writes leaves the old
    pair intact plus an unreferenced tensor file, never a mismatched pair.
    """
    from safetensors.torch import save

    from meminject.atomic import write_bytes_atomic, write_text_atomic
    from meminject.memfile import load_memory_set, read_memory_file

    out = Path(out)
    if out.suffix != ".toml":
        raise BadInputError(f"{out}: the output must be a .toml file")
    exists = out.exists()
    if exists and not append and not force:
        raise BadInputError(f"{out} exists; pass --force to overwrite it or --append to add")
    table = model.model_table()
    previous_tensors: list[Path] = []
    old_text = ""
    if exists and append:
        old = read_memory_file(out)
        if name in {e.name for e in old.entries}:
            raise BadInputError(f"{out} already has a memory named '{name}'")
        if old.model is not None and old.model.fingerprint not in (None, table["fingerprint"]):
            raise BadInputError(
                f"{out} holds memories for another model (fingerprint {old.model.fingerprint})"
            )
        old_text = out.read_text(encoding="utf-8").rstrip() + "\n"
    elif exists:
        previous_tensors = _tensor_files(out)

    data = save(
        {"key": learned.key.contiguous(), "delta": learned.delta.contiguous()},
        metadata=learned.provenance(),
    )
    # Named by what it holds (safetensors' header order is not stable, so not by its bytes).
    content = hashlib.sha256()
    for tensor in (learned.key, learned.delta):
        content.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    content.update(json.dumps(learned.provenance(), sort_keys=True).encode())
    digest = content.hexdigest()[:10]
    tensor_path = out.parent / f"{name}.{digest}.safetensors"

    lines: list[str] = []
    if not old_text:
        lines += [
            "# Local memories learned by `meminject learn`.",
            "version = 1",
            "",
            "[model]",
        ]
        _table(lines, table)
    elif read_memory_file(out).model is None:
        lines += ["", "[model]"]
        _table(lines, table)
    lines += ["", f"# prompt: {json.dumps(learned.prompt, ensure_ascii=False)}"]
    lines.append(
        f"# target: {json.dumps(learned.target, ensure_ascii=False)}; alpha = "
        f"{learned.alpha:.6g}; steps = {learned.steps}; position = {learned.position}"
    )
    if choice is not None:
        lines.append(
            f"# boundary chosen on {choice.n_positives} positives and {choice.n_negatives} "
            f"negatives: accuracy {choice.accuracy:.3f}"
        )
    lines.append("[[memory]]")
    _table(
        lines,
        {
            "name": name,
            "strategy": "gated",
            "site": learned.site,
            "layer": learned.layer,
            "tensors": tensor_path.name,
            "boundary": float(boundary),
            "hardness": float(hardness),
        },
    )
    text = old_text + "\n".join(lines) + "\n"

    write_bytes_atomic(tensor_path, data, overwrite=True)
    staged = out.parent / f".{out.name}.check.toml"
    try:
        staged.write_text(text, encoding="utf-8")
        load_memory_set([staged])  # the new file must validate before it replaces the old
    finally:
        staged.unlink(missing_ok=True)
    write_text_atomic(out, text, overwrite=True)
    for stale in previous_tensors:
        if stale.resolve() != tensor_path.resolve():
            stale.unlink(missing_ok=True)
    return out, tensor_path


def _tensor_files(toml_path: Path) -> list[Path]:
    """Tensor files the current TOML refers to (to remove after a --force rewrite); only
    those inside its directory, by the same rule that governs reading them."""
    from meminject.errors import MemoryFileError
    from meminject.memfile import read_memory_file
    from meminject.tensorfile import resolve_path

    try:
        loaded = read_memory_file(toml_path)
    except MemoryFileError:
        return []
    files = []
    for entry in loaded.entries:
        tensors = getattr(entry.memory, "tensors", None)
        if tensors:
            try:
                files.append(resolve_path(entry, tensors, "tensors"))
            except MemoryFileError:
                continue
    return files
