"""Learning gradient-derived local memories and their gate boundary (docs/local-memories.md).

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
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.backends.bridge import bridge_fwd_hooks
from meminject.dtypes import dtype_name
from meminject.errors import (
    BadInputError,
    ContextTooLongError,
    Location,
    MeminjectError,
    MemoryFileError,
    echo,
)
from meminject.extension import site_hook
from meminject.fsread import FS_ERRORS, describe_mode, fs_reason, read_user_text
from meminject.memfile_writer import memory_file_text
from meminject.schema import NAME_PATTERN, MemoryBase
from meminject.sites import LAYER_SITES, hook_name

if TYPE_CHECKING:
    from torch import Tensor

    from meminject.model_handle import LoadedModel

LEARN_SITES = LAYER_SITES
DEFAULT_GRID = tuple(round(0.05 * i, 4) for i in range(1, 41))  # 0.05 … 2.0
DEFAULT_HARDNESS = 3.0
#: With the default ``--steps`` (1), the α search also tries 2 and then 3 steps before it
#: gives up (one step is often not enough; several smaller steps follow the loss further).
AUTO_MAX_STEPS = 3
#: Largest ``--positive``/``--negative`` file read, in bytes (as for memory files).
MAX_PROMPT_FILE_BYTES = 1 << 20
#: The longest memory name the schema accepts.
NAME_MAX_LENGTH = next(
    int(m.max_length)
    for m in MemoryBase.model_fields["name"].metadata
    if getattr(m, "max_length", None) is not None
)


# --- checks that need no model -----------------------------------------------------------


def check_name(name: str, what: str = "the memory name") -> str:
    """``name`` if the schema accepts it as a memory name (it also names the tensor file, so
    this is what keeps that file inside the output folder), else a BadInputError."""
    if (
        not isinstance(name, str)
        or len(name) > NAME_MAX_LENGTH
        or re.fullmatch(NAME_PATTERN, name) is None
    ):
        raise BadInputError(
            f"{what} {echo(name)} is not a valid memory name: use letters, digits, '.', '_' and "
            f"'-', starting with a letter or digit, at most {NAME_MAX_LENGTH} characters"
        )
    return name


def check_positive(value: float, what: str) -> float:
    """``value`` as a float if it is a finite number above 0, else a BadInputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"{what} must be a number, got {echo(value)}")
    if not math.isfinite(value) or not value > 0:
        raise BadInputError(f"{what} must be a finite number above 0, got {value!r}")
    return float(value)


def check_output(
    out: Path | str,
    *,
    name: str,
    append: bool = False,
    force: bool = False,
    model: LoadedModel | None = None,
) -> Path:
    """Everything about the output that can be checked before anything is learned or
    written: a ``.toml`` path, a regular file or none, a folder that can be written in,
    ``--force``/``--append`` rules and, for ``--append``, an existing file that is valid,
    does not hold ``name`` yet and can take one more ``[[memory]]`` table (with ``model``:
    one made for the same model)."""
    out = Path(out)
    if out.suffix != ".toml":
        raise BadInputError(f"{out}: the output must be a .toml file")
    if append and force:
        raise BadInputError("pass --append or --force, not both")
    try:
        info: os.stat_result | None = out.stat()
    except FileNotFoundError:
        info = None
    except FS_ERRORS as exc:
        raise BadInputError(f"{out}: cannot write the output here: {fs_reason(exc)}") from None
    if info is None:
        folder = _nearest_existing(out.parent)
        if not folder.is_dir():
            raise BadInputError(f"{out}: {folder} is not a directory")
    else:
        if not stat.S_ISREG(info.st_mode):
            raise BadInputError(f"{out}: not a regular file ({describe_mode(info.st_mode)})")
        if not (append or force):
            raise BadInputError(f"{out} exists; pass --force to overwrite it or --append to add")
        folder = out.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"{out}: cannot create files in {folder} (permission denied)")
    if info is not None and append:
        _check_appendable(out, name, model)
    return out


def _check_appendable(out: Path, name: str, model: LoadedModel | None) -> None:
    from meminject.memfile import read_memory_file, tomllib
    from meminject.plugins import get_registry

    old = read_memory_file(out, get_registry())  # errors name the file, line, memory and field
    if name in {e.name for e in old.entries}:
        raise BadInputError(f"{out} already has a memory named '{name}'")
    source = old.entries[0].source if old.entries else out.read_text(encoding="utf-8")
    if "memory" in tomllib.loads(source) and not _HEADER.search(source):
        raise BadInputError(
            f"{out}: its memories are an inline array (memory = [...]), which a [[memory]] "
            "table cannot extend; rewrite them as [[memory]] tables or write to another file"
        )
    if model is not None and old.model is not None:
        fingerprint = old.model.fingerprint
        if fingerprint is not None and not model.made_for(fingerprint):
            raise BadInputError(
                f"{out} holds memories for another model (fingerprint {fingerprint})"
            )


_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*memory[ \t]*\]\]", re.MULTILINE)


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


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
    """The target as it continues a prompt (``LoadedModel.continuation_ids``: a leading
    space is added unless the target already starts with whitespace)."""
    return model.continuation_ids(target)


def check_fits(model: LoadedModel, prompt: str, extra: int = 0, where: str = "") -> int:
    """The prompt's length in tokens (BOS included) if it, plus ``extra`` target tokens fed
    back by teacher forcing, fits the model's context; else a BadInputError (``where``
    says which file and line the prompt came from)."""
    n_ctx = model.dims.n_ctx
    length = len(model.tokenize(prompt))
    prefix = f"{where}: " if where else ""
    if length > n_ctx:
        raise ContextTooLongError(
            f"{prefix}the prompt is {length} tokens, longer than the model's context of "
            f"{n_ctx} tokens"
        )
    if length + extra > n_ctx:
        raise BadInputError(
            f"{prefix}the prompt ({length} tokens) and the {extra} target tokens that "
            f"--teacher-force feeds back are {length + extra} tokens, longer than the model's "
            f"context of {n_ctx} tokens"
        )
    return length


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
        used = target_ids if teacher_force else target_ids[:1]
        check_fits(model, prompt, len(used) - 1)
        prompt_tokens = model.to_tokens(prompt)
        prompt_len = prompt_tokens.shape[1]
        absolute = position + prompt_len if position < 0 else position
        if not 0 <= absolute < prompt_len:
            raise BadInputError(f"position {position} is outside the prompt of {prompt_len} tokens")
        self.position = absolute
        self.prompt_len = prompt_len
        extra = torch.tensor([used[:-1]], dtype=torch.long, device=model.device)
        self.tokens = torch.cat([prompt_tokens, extra], dim=1)
        self.targets = torch.tensor(used, dtype=torch.long, device=model.device)
        self.rows = torch.arange(prompt_len - 1, prompt_len - 1 + len(used), device=model.device)
        self.hook_name = hook_name(site, layer)
        self.where = f"site '{site}' of layer {layer}"
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
    max_steps: int | None = None,
    teacher_force: bool = False,
    max_doublings: int = 40,
    bisections: int = 10,
) -> LearnedMemory:
    """Learn the key and delta that make ``prompt`` continue with ``target``.

    Without ``alpha``, the smallest α that makes the target top-1 in ``steps`` steps is
    searched; if none exists and ``max_steps`` is larger, ``steps + 1`` … ``max_steps``
    steps are tried in turn (``LearnedMemory.steps`` says how many were used). The key and
    the delta are checked to be finite, also in the model's dtype."""
    steps = _check_steps(steps, "steps")
    last = steps if max_steps is None else _check_steps(max_steps, "max_steps")
    if last < steps:
        raise BadInputError(f"max_steps ({last}) must be at least steps ({steps})")
    if alpha is not None:
        alpha = check_positive(alpha, "alpha")
    ids = target_tokens(model, target)
    objective = _Objective(model, prompt, ids, layer, site, position, teacher_force)
    prob_before = objective.first_prob(None)
    hint = "use a smaller --alpha"
    if alpha is None:
        alpha, steps = _search_alpha(objective, steps, last, max_doublings, bisections)
        hint = "try another --layer or --site"
    found = _descend(objective, alpha, steps)
    assert objective.key is not None
    key = objective.key.float().cpu()
    delta = found.float().cpu()
    check_finite(
        key,
        f"key (the activation at {objective.where})",
        model.dtype,
        "the model's activations overflow there; try --dtype float32 or another --layer",
    )
    check_finite(
        delta, f"delta (alpha = {alpha:.6g}, {steps} step{'s' * (steps > 1)})", model.dtype, hint
    )
    return LearnedMemory(
        prompt=prompt,
        target=target,
        target_ids=ids,
        layer=layer,
        site=site,
        position=objective.position,
        key=key,
        delta=delta,
        alpha=alpha,
        steps=steps,
        teacher_force=teacher_force,
        prob_before=prob_before,
        prob_after=objective.first_prob(found),
    )


def _check_steps(steps: int, what: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise BadInputError(f"{what} must be a whole number of at least 1, got {echo(steps)}")
    return steps


def check_finite(tensor: Tensor, what: str, dtype: Any = None, hint: str = "") -> None:
    """A BadInputError unless every entry of ``tensor`` is finite, as it is and cast to
    ``dtype`` (the dtype the memory is added in at inference)."""
    import torch

    tail = f"; {hint}" if hint else ""
    if not bool(torch.isfinite(tensor).all()):
        raise BadInputError(f"the learned {what} is not finite (inf or nan){tail}")
    if dtype is not None and not bool(torch.isfinite(tensor.to(dtype)).all()):
        largest = float(tensor.abs().max())
        name = dtype_name(dtype)
        raise BadInputError(
            f"the learned {what} overflows {name} (largest entry {largest:.3g}){tail}"
        )


class _NoStepSize(Exception):
    def __init__(self, high: float) -> None:
        self.high = high


def _search_alpha(
    objective: _Objective, first: int, last: int, max_doublings: int, bisections: int
) -> tuple[float, int]:
    """The smallest α for the fewest steps from ``first`` to ``last`` that reaches top-1."""
    high = 0.0
    for steps in range(first, last + 1):
        try:
            return _smallest_alpha(objective, steps, max_doublings, bisections), steps
        except _NoStepSize as exc:
            high = max(high, exc.high)
    tried = f"{first} step{'s' * (first > 1)}" if first == last else f"{first} to {last} steps"
    raise BadInputError(
        f"no step size up to {high:.3g} makes the target top-1 with {tried} at "
        f"{objective.where}; try more --steps (e.g. --steps {2 * last}), another --layer or "
        "another --site"
    )


def _smallest_alpha(
    objective: _Objective, steps: int, max_doublings: int, bisections: int
) -> float:
    """Smallest α (to bisection precision) whose descent makes the target top-1."""
    import torch

    loss, grad = objective.loss_and_grad(_zero(objective))
    norm_sq = float((grad.float() ** 2).sum())
    if not (math.isfinite(loss) and math.isfinite(norm_sq)):
        raise BadInputError(
            f"the loss or its gradient at {objective.where} is not finite; the model's "
            "activations overflow here (try --dtype float32 or another --layer)"
        )
    if norm_sq == 0.0:
        raise BadInputError(
            f"the loss does not depend on the activation at {objective.where} (zero "
            "gradient); try another --layer, --site or --position"
        )

    def works(alpha: float) -> bool:
        delta = _descend(objective, alpha, steps)
        # A step so large that the delta overflows never counts as reaching top-1.
        return bool(torch.isfinite(delta).all()) and objective.is_top1(delta)

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
            raise _NoStepSize(high)
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
    #: At the chosen boundary: (index, top-1 token id) of each positive whose top-1 is not
    #: the target, and of each negative whose top-1 is — the prompts to look at.
    failing_positives: tuple[tuple[int, int], ...] = ()
    failing_negatives: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class PromptLine:
    """One prompt of a ``--positive``/``--negative`` file and where it was written."""

    text: str
    path: Path
    line: int  # 1-based

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_prompt_lines(path: Path | str) -> list[PromptLine]:
    """One prompt per line (lines end at ``\\n``); blank lines and lines starting with '#'
    are skipped. Only a regular file of at most :data:`MAX_PROMPT_FILE_BYTES` is read: a
    FIFO, a device or a directory is refused before it is opened (reading a FIFO would
    block), and checked again on the open file, so a swap in between is caught too."""
    path = Path(path)
    text = read_user_text(path, MAX_PROMPT_FILE_BYTES, "prompt files")
    prompts = [
        PromptLine(line.strip(), path, number)
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise BadInputError(f"{path}: holds no prompts")
    return prompts


def read_prompts(path: Path | str) -> list[str]:
    """The prompts of :func:`read_prompt_lines`, as strings."""
    return [p.text for p in read_prompt_lines(path)]


def check_prompts_fit(model: LoadedModel, prompts: Sequence[PromptLine]) -> None:
    """A BadInputError naming the file and line of the first prompt longer than the model's
    context (the boundary search runs each prompt whole)."""
    for prompt in prompts:
        check_fits(model, prompt.text, where=prompt.where)


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
    from meminject.extension import InjectionContext
    from meminject.gates import gate_body

    device = model.device
    body = gate_body(
        learned.key.flatten()[None].to(device),
        learned.delta.flatten()[None].to(device),
        torch.tensor([boundary], device=device),
        torch.tensor([hardness], device=device),
        "all",
    )
    hook = CompiledHook(
        site_hook(learned.site, learned.layer, body),
        "gated",
        "meminject.learn",
    )
    # Right padding is exact for a causal model with absolute positions: real tokens
    # never attend to the pads after them, so one batch replaces one forward per prompt.
    rows = [model.tokenize(p) for p in prompts]
    n_ctx = model.dims.n_ctx
    for i, row in enumerate(rows):
        if not 0 < len(row) <= n_ctx:
            raise BadInputError(
                f"prompt #{i + 1} is {len(row)} tokens; the model reads 1 to {n_ctx} tokens"
            )
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
    grid = check_grid(grid)
    hardness = check_positive(hardness, "hardness")
    for kind, prompts in (("positive", positives), ("negative", negatives)):
        for i, prompt in enumerate(prompts):
            check_fits(model, prompt, where=f"{kind} prompt #{i + 1}")
    target = learned.target_ids[0]
    table = []
    for b in grid:
        top = gated_top1(model, learned, [*positives, *negatives], b, hardness)
        pos_ok = sum(t == target for t in top[: len(positives)])
        neg_ok = sum(t != target for t in top[len(positives) :])
        table.append(BoundaryRow(b, pos_ok, neg_ok, (pos_ok + neg_ok) / len(top)))
    centre, best = choose_boundary(table)
    top = gated_top1(model, learned, [*positives, *negatives], centre, hardness)
    failing_pos = tuple((i, t) for i, t in enumerate(top[: len(positives)]) if t != target)
    failing_neg = tuple((i, t) for i, t in enumerate(top[len(positives) :]) if t == target)
    return BoundaryChoice(
        centre, best, table, len(positives), len(negatives), failing_pos, failing_neg
    )


def check_grid(grid: Sequence[float]) -> list[float]:
    """The grid sorted and without repeats, if it is not empty and every boundary is a
    finite number above 0."""
    values = sorted({check_positive(b, "every boundary of the grid") for b in grid})
    if not values:
        raise BadInputError("the boundary grid is empty")
    return values


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

    Everything is checked before the first byte is written: the name, boundary and
    hardness, the output (:func:`check_output`), the tensors (finite, also in the model's
    dtype) and the new TOML text itself, validated in a private temporary folder. If a
    write still fails, what was written is removed again (the tensor file, folders made
    for the output), so a failure leaves the file system as it was.

    The tensor file's name carries a hash of its contents, so it never overwrites a
    file that an existing TOML points at: a crash between the two writes leaves the old
    pair intact plus an unreferenced tensor file, never a mismatched pair.
    """
    from safetensors.torch import save

    check_name(name)
    boundary = check_positive(boundary, "boundary")
    hardness = check_positive(hardness, "hardness")
    out = check_output(out, name=name, append=append, force=force, model=model)
    exists = out.exists()
    # The tensors as saved: float32, contiguous, on the CPU; checked after the cast.
    key = learned.key.detach().float().cpu().contiguous()
    delta = learned.delta.detach().float().cpu().contiguous()
    check_finite(key, "key", model.dtype)
    check_finite(delta, "delta", model.dtype, "use a smaller --alpha")
    table = model.model_table()
    previous_tensors: list[Path] = []
    old_text = ""
    old_has_model = False
    if exists and append:
        from meminject.memfile import read_memory_file
        from meminject.plugins import get_registry

        old_has_model = read_memory_file(out, get_registry()).model is not None
        old_text = out.read_text(encoding="utf-8").rstrip() + "\n"
    elif exists:
        previous_tensors = _tensor_files(out)

    data = save({"key": key, "delta": delta}, metadata=learned.provenance())
    # Named by what it holds (safetensors' header order is not stable, so not by its bytes).
    content = hashlib.sha256()
    for tensor in (key, delta):
        content.update(tensor.numpy().tobytes())
    content.update(json.dumps(learned.provenance(), sort_keys=True).encode())
    digest = content.hexdigest()[:10]
    tensor_path = out.parent / f"{name}.{digest}.safetensors"

    comments = [
        f"prompt: {json.dumps(learned.prompt, ensure_ascii=False)}",
        f"target: {json.dumps(learned.target, ensure_ascii=False)}; alpha = "
        f"{learned.alpha:.6g}; steps = {learned.steps}; position = {learned.position}",
    ]
    if choice is not None:
        comments.append(
            f"boundary chosen on {choice.n_positives} positives and {choice.n_negatives} "
            f"negatives: accuracy {choice.accuracy:.3f}"
        )
    memory = {
        "name": name,
        "strategy": "gated",
        "site": learned.site,
        "layer": learned.layer,
        "tensors": tensor_path.name,
        "boundary": boundary,
        "hardness": hardness,
    }
    text = memory_file_text(
        memory,
        model=table,
        comments=comments,
        existing=old_text,
        existing_has_model=old_has_model,
        header=["Local memories learned by `meminject learn`."],
    )
    _check_text(out, text, name)  # the new file must validate before anything is written
    _write_pair(out, text, tensor_path, data)
    for stale in previous_tensors:
        if stale.resolve() != tensor_path.resolve():
            stale.unlink(missing_ok=True)
    return out, tensor_path


def _check_text(out: Path, text: str, name: str) -> None:
    """Validate the TOML text that would replace ``out``, in a private temporary folder
    (never beside ``out``); a problem is reported against ``out``, the real file."""
    import tempfile

    from meminject.memfile import load_memory_set
    from meminject.plugins import get_registry

    try:
        with tempfile.TemporaryDirectory(prefix="meminject-learn-") as folder:
            staged = Path(folder) / out.name
            staged.write_text(text, encoding="utf-8")
            try:
                load_memory_set([staged], get_registry())
            except MemoryFileError as exc:
                where = Location(None, None, exc.location.memory, exc.location.field).render()
                detail = exc.message.replace(str(staged), str(out))
                raise BadInputError(
                    f"{out}: writing memory '{name}' would make an invalid file "
                    f"({where + ': ' if where else ''}{detail}); nothing was written"
                ) from None
    except OSError as exc:
        raise MeminjectError(f"cannot check the new {out} in a temporary folder: {exc}") from None


def _write_pair(out: Path, text: str, tensor_path: Path, data: bytes) -> None:
    """Tensors, then the TOML, each atomically; on any failure what this call created (the
    tensor file, missing folders) is removed and a replaced tensor file restored."""
    from meminject.atomic import write_bytes_atomic, write_text_atomic

    missing = []
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    existed = os.path.lexists(tensor_path)
    if existed and not tensor_path.is_file():
        raise BadInputError(f"{tensor_path}: in the way of the tensor file (not a regular file)")
    previous: bytes | None = None  # the bytes of a same-named tensor file, once replaced
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        old = tensor_path.read_bytes() if existed else None
        if old != data:
            write_bytes_atomic(tensor_path, data, overwrite=True)
            previous = old
        write_text_atomic(out, text, overwrite=True)
    except BaseException as exc:
        try:
            if not existed:
                tensor_path.unlink(missing_ok=True)
            elif previous is not None:
                write_bytes_atomic(tensor_path, previous, overwrite=True)
        except OSError:
            pass
        for made in missing:  # deepest first
            try:
                made.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):
            reason = fs_reason(exc)
            raise BadInputError(f"{out}: cannot write: {reason}; nothing was written") from None
        raise


def _tensor_files(toml_path: Path) -> list[Path]:
    """Tensor files the current TOML refers to (to remove after a --force rewrite); only
    those inside its directory, by the same rule that governs reading them."""
    from meminject.errors import MemoryFileError
    from meminject.memfile import read_memory_file
    from meminject.plugins import get_registry
    from meminject.tensorfile import resolve_path

    try:
        loaded = read_memory_file(toml_path, get_registry())
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
