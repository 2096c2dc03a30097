"""What a plugin implements: encoder requests, strategies and the hooks they compile to.

These are the contracts between the engine and built-in or third-party code.
The module imports no torch at import time, because strategies must be
registrable (and their parameter models validated) without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from meminject.schema import MemoryBase, PositionMode
from meminject.sites import hook_name, site_info

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

    from meminject.memfile import MemoryEntry
    from meminject.model_handle import LoadedModel


@dataclass(frozen=True)
class EncodeRequest:
    """Everything an encoder may need; new fields may be added later."""

    model: LoadedModel
    memory: Any  # the validated memory (an AddMemory or a plugin's subclass)
    params: BaseModel | None  # the encoder's own table, validated by its params model

    @property
    def text(self) -> str:
        return str(self.memory.text)

    @property
    def layer(self) -> int:
        return int(self.memory.layer)

    def distinct_tokens(self) -> list[int]:
        """Token ids of the text without BOS, each once, in order of first occurrence."""
        return list(dict.fromkeys(self.model.tokenize(self.text, prepend_bos=False)))


class InjectionContext:
    """Where the current forward pass sits in the sequence, so positions mean the same
    thing with and without a KV cache.

    ``offset`` is the absolute position of the first token in the current forward
    (0 without a cache; the number of cached tokens with one); ``prompt_len`` is the
    prompt's length including BOS. Absolute positions never shift as tokens are
    generated, which is what makes cached and uncached generation agree.
    """

    def __init__(self, prompt_len: int | None = None) -> None:
        self.offset = 0
        self.prompt_len = prompt_len

    def index(
        self, positions: PositionMode | Sequence[int], seq_len: int, device: Any = None
    ) -> slice | torch.Tensor | None:
        """Indices into the current forward's position axis, or None if none apply."""
        start, stop = self.offset, self.offset + seq_len
        prompt_len = self.prompt_len if self.prompt_len is not None else stop
        if positions == "all":
            return slice(None)
        if positions == "prompt":
            lo, hi = start, min(stop, prompt_len)
        elif positions == "generated":
            lo, hi = max(start, prompt_len), stop
        elif positions == "last":
            lo, hi = prompt_len - 1, prompt_len
            lo, hi = max(lo, start), min(hi, stop)
        else:
            import torch

            absolute = sorted({p + prompt_len if p < 0 else p for p in positions})
            local = [p - start for p in absolute if start <= p < stop]
            if not local:
                return None
            return torch.tensor(local, dtype=torch.long, device=device)
        if lo >= hi:
            return None
        return slice(lo - start, hi - start)


#: A compiled hook body: takes the activation and the context, returns the new activation.
HookBody = Callable[["torch.Tensor", InjectionContext], "torch.Tensor"]


@dataclass(frozen=True)
class Addition:
    """A constant added at a hook point's positions, as data rather than code.

    A backend that cannot run Python inside its forward (llama.cpp control vectors,
    vLLM) can still apply a hook whose every change is such an addition.
    """

    #: Where it is added: the site as compiled (``attn_out`` for a lowered per-head
    #: memory; ``attn_heads_sum`` is the attention's output before a post-norm).
    site: str
    layer: int
    hook_name: str
    #: A positions mode or absolute positions, as in a memory file.
    positions: Any
    #: ``[width]``, in the model's coordinates, dtype and device; τ already applied.
    vector: torch.Tensor


@dataclass(frozen=True)
class Gate:
    """A bank of gated memories at one hook point and positions, as data rather than code.

    The same computation as :func:`meminject.gates.gate_body`, handed to a backend that
    must rebuild it in another process (vLLM's workers), where a pickled closure would be
    code from the wire: ``a ← a + s·Δ`` with ``s = exp(−(x²/b²)^h)``,
    ``x = 1 − (a·k)/‖k‖²``, every gate reading the activation as it arrives.
    """

    site: str
    layer: int
    hook_name: str
    #: A positions mode or absolute positions, as in a memory file.
    positions: Any
    #: ``[memories, width]`` float32 keys and deltas; ``[memories]`` boundaries, hardness.
    keys: torch.Tensor
    deltas: torch.Tensor
    boundary: torch.Tensor
    hardness: torch.Tensor
    #: ``[memories]`` gate codes (``meminject.gates.GATES``); None: every gate is
    #: ``projection``, and ``boundary`` holds each memory's own gate parameter.
    kinds: torch.Tensor | None = None


@dataclass(frozen=True)
class SiteHook:
    """One strategy's work at one hook point. The engine chains all bodies at a hook."""

    hook_name: str
    body: HookBody
    needs_attn_result: bool = False  # the bridge must compute per-head results
    #: The same change as ``body``, as data, when it is nothing but additions; empty
    #: when the body does something else (a gate, a plugin's computation).
    additions: tuple[Addition, ...] = ()
    #: The same change as ``body``, as data, when it is nothing but gated banks.
    gates: tuple[Gate, ...] = ()


def site_hook(site: str, layer: int, body: HookBody) -> SiteHook:
    """A :class:`SiteHook` running ``body`` at ``site`` of ``layer``, with the bridge asked
    for per-head results when the site needs them. The one way a strategy should build
    its hooks: it cannot misspell a hook point or forget the flag."""
    info = site_info(site)
    return SiteHook(hook_name(site, layer), body, needs_attn_result=info.per_head)


class CompileContext(Protocol):
    """What the engine offers a strategy while compiling; new members may be added."""

    @property
    def model(self) -> LoadedModel: ...

    def encode(self, memory: Any) -> torch.Tensor:
        """The memory's vector from its encoder, computed once per (memory, model) and
        checked: a finite float tensor of shape ``[d_model]``, or a
        :class:`~meminject.errors.PluginError` naming the encoder's plugin."""
        ...

    def error(self, memory: Any, message: str, field: str | None = None) -> Exception:
        """An error located at the memory's file, name and field, to raise."""
        ...

    def entry(self, memory: Any) -> MemoryEntry:
        """Where the memory came from: its file, index and the file's [model] table."""
        ...

    @property
    def allow_outside_paths(self) -> bool:
        """Whether tensor paths may leave the memory file's directory (an explicit flag)."""
        ...


class Strategy:
    """Base class of injection strategies.

    Subclasses set ``memory_model`` and implement ``compile``, which receives every
    active memory of this strategy in a set at once (so a strategy can batch memories
    that share a site) and returns the hooks to install. The strategy's name is the one
    its memory model's ``strategy: Literal[...]`` states; registration sets ``name`` from
    it (a ``name`` given by hand must agree).
    """

    name: ClassVar[str]
    memory_model: ClassVar[type[MemoryBase]]

    def compile(self, memories: Sequence[Any], ctx: CompileContext) -> list[SiteHook]:
        raise NotImplementedError

    def is_noop(self, memory: Any) -> bool:
        """A memory that cannot change any activation; the engine skips it entirely."""
        return not memory.enabled
