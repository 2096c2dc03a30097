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
from meminject.schema import GATES, NAME_PATTERN, MemoryBase
from meminject.sites import LAYER_SITES, hook_name

if TYPE_CHECKING:
    from torch import Tensor

    from meminject.model_handle import LoadedModel

LEARN_SITES = LAYER_SITES
DEFAULT_GRID = GATES["projection"].grid  # 0.05 … 0.95: the boundary is below 1
DEFAULT_HARDNESS = 3.0
#: The target's log-probability must beat the runner-up's by this much (nats), in the
#: written file run through the generation path (``meminject generate``'s code, KV cache
#: included): the smallest α that makes the target top-1 leaves no room for the gate at the
#: other positions, float rounding and the backend generate runs on.
DEFAULT_MARGIN = 0.5
#: When the written file misses the margin, α is raised by this factor, at most this often.
RAISE_FACTOR = 1.5
MAX_RAISES = 8
#: After a raise, bisections between the α that missed and the one that reached it.
REFINE_BISECTIONS = 4
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
        return self.margin(delta) > 0

    def margin(self, delta: Tensor | None) -> float:
        """The smallest, over the target rows, of the target's log-probability minus the
        best other token's (positive: the target is top-1 everywhere)."""
        import torch

        with torch.no_grad():
            logp = self.logits(delta).log_softmax(-1)
        rows = torch.arange(len(self.targets), device=logp.device)
        target = logp[rows, self.targets]
        others = logp.clone()
        others[rows, self.targets] = -math.inf
        return float((target - others.max(-1).values).min())

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
    margin: float = DEFAULT_MARGIN,
    max_doublings: int = 40,
    bisections: int = 10,
) -> LearnedMemory:
    """Learn the key and delta that make ``prompt`` continue with ``target``.

    Without ``alpha``, the smallest α that puts the target's log-probability ``margin``
    nats above the runner-up's (at every target row, with the delta at the key's
    position) in ``steps`` steps is searched; if none exists and ``max_steps`` is larger,
    ``steps + 1`` … ``max_steps`` steps are tried in turn (``LearnedMemory.steps`` says how
    many were used). The key and the delta are checked to be finite, also in the model's dtype."""
    steps = _check_steps(steps, "steps")
    last = steps if max_steps is None else _check_steps(max_steps, "max_steps")
    if last < steps:
        raise BadInputError(f"max_steps ({last}) must be at least steps ({steps})")
    if alpha is not None:
        alpha = check_positive(alpha, "alpha")
    margin = check_positive(margin, "margin")
    ids = target_tokens(model, target)
    objective = _Objective(model, prompt, ids, layer, site, position, teacher_force)
    prob_before = objective.first_prob(None)
    hint = "use a smaller --alpha"
    if alpha is None:
        alpha, steps = _search_alpha(objective, steps, last, margin, max_doublings, bisections)
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
    objective: _Objective,
    first: int,
    last: int,
    margin: float,
    max_doublings: int,
    bisections: int,
) -> tuple[float, int]:
    """The smallest α for the fewest steps from ``first`` to ``last`` that puts the target
    ``margin`` nats above the runner-up."""
    high = 0.0
    for steps in range(first, last + 1):
        try:
            return _smallest_alpha(objective, steps, margin, max_doublings, bisections), steps
        except _NoStepSize as exc:
            high = max(high, exc.high)
    tried = f"{first} step{'s' * (first > 1)}" if first == last else f"{first} to {last} steps"
    raise BadInputError(
        f"no step size up to {high:.3g} makes the target top-1 by a margin of {margin:g} "
        f"nats with {tried} at {objective.where}; try more --steps (e.g. --steps "
        f"{2 * last}), a smaller --margin, another --layer or another --site"
    )


def _smallest_alpha(
    objective: _Objective, steps: int, margin: float, max_doublings: int, bisections: int
) -> float:
    """Smallest α (to bisection precision) whose descent puts the target ``margin`` nats
    above the runner-up."""
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
        return bool(torch.isfinite(delta).all()) and objective.margin(delta) >= margin

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
    #: The gate whose parameter was searched (``boundary``, ``min_cosine`` or ``radius``).
    gate: str = "projection"
    #: Leave-one-out: each example scored by the value chosen on the others (the chosen
    #: value's own accuracy is measured on the prompts that chose it, so it is optimistic).
    loo_accuracy: float | None = None
    loo_right: tuple[bool, ...] = ()


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
    gate: str = "projection",
) -> list[int]:
    """Top-1 next token of each prompt with the memory applied at every position, through
    the same hook body as the ``gated`` strategy (``boundary``: the gate's parameter)."""
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
        None if gate == "projection" else torch.tensor([GATES[gate].code], device=device),
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
    grid: Sequence[float] | None = None,
    gate: str = "projection",
    leave_one_out: bool = True,
) -> BoundaryChoice:
    """Score every grid value of the gate's parameter by accuracy (positives whose top-1
    is the target plus negatives whose top-1 is not, over both sets); choose the best, and
    among ties the centre of the widest run of best values. With ``leave_one_out``, each
    example is also scored by the value chosen on all the others."""
    if not positives and not negatives:
        raise BadInputError("boundary search needs positive or negative prompts")
    kind = GATES[gate]
    grid = check_grid(kind.grid if grid is None else grid, gate)
    hardness = check_positive(hardness, "hardness")
    for kind_name, prompts in (("positive", positives), ("negative", negatives)):
        for i, prompt in enumerate(prompts):
            check_fits(model, prompt, where=f"{kind_name} prompt #{i + 1}")
    target = learned.target_ids[0]
    every = [*positives, *negatives]
    n_pos = len(positives)

    def right(tops: Sequence[int], indices: Sequence[int]) -> list[bool]:
        return [(t == target) == (i < n_pos) for t, i in zip(tops, indices, strict=True)]

    table = []
    ok_at: list[list[bool]] = []  # per grid value, per example
    for b in grid:
        ok = right(gated_top1(model, learned, every, b, hardness, gate), range(len(every)))
        ok_at.append(ok)
        table.append(_row(b, ok, n_pos))
    centre, best = choose_boundary(table)
    top = gated_top1(model, learned, every, centre, hardness, gate)
    failing_pos = tuple((i, t) for i, t in enumerate(top[:n_pos]) if t != target)
    failing_neg = tuple((i, t) for i, t in enumerate(top[n_pos:]) if t == target)
    loo: tuple[bool, ...] = ()
    if leave_one_out and len(every) > 1:
        chosen = []
        for i in range(len(every)):
            rows = [
                _row(b, ok[:i] + ok[i + 1 :], n_pos - (i < n_pos))
                for b, ok in zip(grid, ok_at, strict=True)
            ]
            chosen.append(choose_boundary(rows)[0])
        results: dict[int, bool] = {}
        for value in sorted(set(chosen)):
            indices = [i for i, c in enumerate(chosen) if c == value]
            tops = gated_top1(model, learned, [every[i] for i in indices], value, hardness, gate)
            results.update(zip(indices, right(tops, indices), strict=True))
        loo = tuple(results[i] for i in range(len(every)))
    return BoundaryChoice(
        centre,
        best,
        table,
        n_pos,
        len(negatives),
        failing_pos,
        failing_neg,
        gate,
        sum(loo) / len(loo) if loo else None,
        loo,
    )


def _row(value: float, ok: Sequence[bool], n_pos: int) -> BoundaryRow:
    pos_ok = sum(ok[:n_pos])
    neg_ok = sum(ok[n_pos:])
    return BoundaryRow(value, pos_ok, neg_ok, (pos_ok + neg_ok) / len(ok) if ok else 0.0)


def check_grid(grid: Sequence[float], gate: str = "projection") -> list[float]:
    """The grid sorted and without repeats, if it is not empty and every value is a finite
    number the gate accepts (the projection gate's boundary is in (0, 1))."""
    values = sorted({check_positive(b, "every boundary of the grid") for b in grid})
    if not values:
        raise BadInputError("the boundary grid is empty")
    kind = GATES[gate]
    for value in values:
        problem = kind.check(value)
        if problem is not None:
            raise BadInputError(f"--grid: {problem}")
    return values


def check_gate_value(value: float, gate: str, what: str = "--boundary") -> float:
    """``value`` if it is a valid parameter of ``gate``, else a BadInputError."""
    value = check_positive(value, what)
    problem = GATES[gate].check(value)
    if problem is not None:
        raise BadInputError(f"{what}: {problem}")
    return value


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


# --- the written file, through the generation path ------------------------------------


@dataclass(frozen=True)
class FileScore:
    """What ``meminject generate`` gives for a memory file after the learning prompt: the
    probability of the target's first token with the file (``prob_after``) and without
    (``prob_before``), as ``--show-top`` shows them (``None``: not among the
    :data:`SHOWN` most likely), and the margin: over the target tokens scored (all with
    teacher forcing, else the first), the smallest log-probability of the target token
    minus the best other token's, greedy with the KV cache (``-inf`` once the target is
    outside the :data:`SHOWN` most likely)."""

    prob_before: float | None
    prob_after: float | None
    margin: float
    top1: str  # the first generated token with the file
    runner_up: str  # the best other token at the step with the smallest margin
    backend: str

    def summary(self) -> str:
        return (
            f"generate with this file: p(target) {_p(self.prob_after)}, margin "
            f"{self.margin:.3f} nats over {self.runner_up!r}"
        )


#: How many most likely tokens the file's score asks ``generate`` for.
SHOWN = 20


def _p(prob: float | None) -> str:
    return f"< top {SHOWN}" if prob is None else f"{prob:.4f}"


def score_file(
    model: LoadedModel,
    path: Path | str,
    prompt: str,
    target_ids: Sequence[int],
    *,
    teacher_force: bool = False,
) -> FileScore:
    """Score a written memory file the way ``meminject generate -m FILE PROMPT`` runs it
    (:func:`meminject.generation.generate`: the memory set read from the file, the
    default backend, the KV cache)."""
    from meminject.generation import generate

    scored = list(target_ids) if teacher_force else list(target_ids[:1])
    shown = min(SHOWN, model.dims.d_vocab)
    plain = generate(model, prompt, None, max_new_tokens=1, show_top=shown)
    edited = generate(
        model, prompt, [Path(path)], max_new_tokens=len(scored), show_top=shown, logprobs=shown
    )

    def prob(run: Any) -> float | None:
        return next((t.prob for t in run.top_next if t.token_id == scored[0]), None)

    margin, runner_up = math.inf, ""
    for step, want in enumerate(scored):
        if step >= len(edited.token_logprobs):
            margin, runner_up = -math.inf, "(generation ended)"
            break
        top = edited.token_logprobs[step].top
        target_lp = next((lp for _, i, lp in top if i == want), -math.inf)
        best_other = next(((tok, lp) for tok, i, lp in top if i != want), ("", -math.inf))
        here = target_lp - best_other[1]
        if here < margin:
            margin, runner_up = here, best_other[0]
        if edited.new_tokens[step] != want:
            break  # greedy left the target: later steps do not continue it
    first = edited.token_logprobs[0].token if edited.token_logprobs else ""
    return FileScore(prob(plain), prob(edited), margin, first, runner_up, edited.backend)


@dataclass(frozen=True)
class Fitted:
    """A memory as written: what was learned, the gate parameter, the examples' choice, the
    score of the written file, and how often α was raised to reach the margin."""

    learned: LearnedMemory
    boundary: float
    choice: BoundaryChoice | None
    score: FileScore
    raised: int
    paths: tuple[Path, Path]


def fit_and_write(
    model: LoadedModel,
    prompt: str,
    target: str,
    out: Path | str,
    *,
    layer: int,
    site: str,
    name: str,
    position: int = -1,
    alpha: float | None = None,
    steps: int = 1,
    max_steps: int | None = None,
    teacher_force: bool = False,
    margin: float = DEFAULT_MARGIN,
    gate: str = "projection",
    hardness: float = DEFAULT_HARDNESS,
    boundary: float | None = None,
    positives: Sequence[str] = (),
    negatives: Sequence[str] = (),
    grid: Sequence[float] | None = None,
    append: bool = False,
    force: bool = False,
    on_learned: Any = None,
) -> Fitted:
    """Learn a memory, choose its gate parameter on the examples (or take ``boundary``, or
    the gate's default), write it to a private folder and score that file through the
    generation path; while its margin is below ``margin``, raise α by
    :data:`RAISE_FACTOR` (at most :data:`MAX_RAISES` times; never for a given ``alpha``)
    and choose again. Only a file that reaches the margin is written to ``out``, and the
    score returned is the written file's. ``on_learned(learned, choice, score)`` is called
    for each try (for progress output)."""
    import tempfile

    margin = check_positive(margin, "margin")
    if gate not in GATES:
        raise BadInputError(f"unknown gate '{gate}'; registered: {', '.join(GATES)}")
    if boundary is not None:
        boundary = check_gate_value(boundary, gate)
    learned = learn(
        model,
        prompt,
        target,
        layer=layer,
        site=site,
        position=position,
        alpha=alpha,
        steps=steps,
        max_steps=max_steps,
        teacher_force=teacher_force,
        margin=margin,
    )

    def attempt(candidate: LearnedMemory) -> tuple[BoundaryChoice | None, float, FileScore]:
        choice = None
        value = boundary
        if value is None and (positives or negatives):
            choice = search_boundary(
                model, candidate, positives, negatives, hardness=hardness, grid=grid, gate=gate
            )
            value = choice.boundary
        elif value is None:
            value = GATES[gate].default
        with tempfile.TemporaryDirectory(prefix="meminject-learn-") as folder:
            staged, _ = write_learned(
                Path(folder) / "staged.toml",
                candidate,
                model,
                name=name,
                boundary=value,
                hardness=hardness,
                gate=gate,
            )
            score = score_file(
                model, staged, prompt, candidate.target_ids, teacher_force=teacher_force
            )
        if on_learned is not None:
            on_learned(candidate, choice, score)
        return choice, value, score

    def relearn(step: float) -> LearnedMemory:
        return learn(
            model,
            prompt,
            target,
            layer=layer,
            site=site,
            position=position,
            alpha=step,
            steps=learned.steps,
            teacher_force=teacher_force,
            margin=margin,
        )

    choice, value, score = attempt(learned)
    raised = 0
    low = learned.alpha
    while score.margin < margin:
        if alpha is not None or raised >= MAX_RAISES:
            how = (
                "raise --alpha"
                if alpha is not None
                else f"α was raised {raised} times to {learned.alpha:.6g}"
            )
            raise BadInputError(
                f"the memory as written does not make the target top-1 by the margin: "
                f"generate gives p(target) {_p(score.prob_after)}, margin {score.margin:.3f} "
                f"nats over {score.runner_up!r} (--margin {margin:g}); {how}, or try a "
                f"smaller --margin, a narrower gate, another --layer or --site; nothing was "
                "written"
            )
        raised += 1
        low = learned.alpha
        learned = relearn(learned.alpha * RAISE_FACTOR)
        choice, value, score = attempt(learned)
    if raised:
        # The raise overshoots: bisect between the last α that missed and the one that
        # reached the margin, keeping the smallest that reaches it.
        for _ in range(REFINE_BISECTIONS):
            candidate = relearn((low + learned.alpha) / 2)
            tried = attempt(candidate)
            if tried[2].margin >= margin:
                learned, (choice, value, score) = candidate, tried
            else:
                low = candidate.alpha
    paths = write_learned(
        out,
        learned,
        model,
        name=name,
        boundary=value,
        hardness=hardness,
        append=append,
        force=force,
        choice=choice,
        gate=gate,
        score=score,
    )
    written = score_file(model, paths[0], prompt, learned.target_ids, teacher_force=teacher_force)
    return Fitted(learned, value, choice, written, raised, paths)


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
    gate: str = "projection",
    score: FileScore | None = None,
) -> tuple[Path, Path]:
    """Write the tensors, then the TOML, each atomically; returns both paths.
    ``boundary`` is the value of ``gate``'s parameter (``boundary``, ``min_cosine`` or
    ``radius``); ``score``, what the generation path gave for the file, goes into a
    comment.

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
    if gate not in GATES:
        raise BadInputError(f"unknown gate '{gate}'; registered: {', '.join(GATES)}")
    boundary = check_gate_value(boundary, gate, GATES[gate].field)
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
        loo = (
            f"; leave-one-out {choice.loo_accuracy:.3f}" if choice.loo_accuracy is not None else ""
        )
        comments.append(
            f"{GATES[gate].field} chosen on {choice.n_positives} positives and "
            f"{choice.n_negatives} negatives: accuracy {choice.accuracy:.3f}{loo}"
        )
    if score is not None:
        comments.append(score.summary())
    memory: dict[str, Any] = {
        "name": name,
        "strategy": "gated",
        "site": learned.site,
        "layer": learned.layer,
        "tensors": tensor_path.name,
    }
    if gate != "projection":
        memory["gate"] = gate
    memory[GATES[gate].field] = boundary
    memory["hardness"] = hardness
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
