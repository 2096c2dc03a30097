"""Generation in vLLM with a memory set: ``meminject generate --backend vllm`` and
:func:`load_vllm`.

vLLM runs its own decoding loop, scheduler and batching in other processes, so it is
not a :class:`meminject.backends.Backend` (one forward per call of meminject's loop);
it is a second way to generate, beside :mod:`meminject.generation`, that returns the
same :class:`~meminject.generation.Generation` records.

How a run goes:

1. The model loads once the meminject way (:func:`meminject.loading.load_model`, plain
   Hugging Face modules, no TransformerLens), and the memory set compiles on it with
   meminject's own engine, so encoders, τ units, head routing and gate checks are the
   ones every other backend runs (:mod:`meminject.vllm_backend.plan`). Only the plan's
   data and the tokenizer are kept; the weights are released before vLLM loads its own.
2. ``vllm.LLM`` loads the same checkpoint directory with meminject's worker extension
   (:mod:`meminject.vllm_backend.worker`), eager mode (hooks are Python, outside any
   compiled graph), and ``collective_rpc`` installs the plan on every worker.
3. Prompts are tokenized by meminject (its BOS rule and chat template), sent as token
   ids, and carry the plan's digest as their prefix-cache salt: keys and values
   computed under one memory set are never reused under another, or without memories,
   so prefix caching can stay on.

vLLM itself is imported only inside functions: meminject does not depend on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meminject.errors import BadInputError

if TYPE_CHECKING:
    from meminject.generation import DecodeOptions, Generation
    from meminject.memfile import MemorySet
    from meminject.model_handle import LoadedModel
    from meminject.vllm_backend.plan import MemoryPlan

#: The importable class vLLM mixes into its workers.
WORKER_EXTENSION = "meminject.vllm_backend.worker.MemoryWorkerExtension"


def vllm_available() -> str | None:
    """None when vLLM imports, else why not (one line)."""
    try:
        # LLM, not just the package: a directory named vllm on sys.path (a namespace
        # package) imports too.
        from vllm import LLM  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except Exception as exc:
        return f"vllm is not importable ({type(exc).__name__}: {exc}); see docs/vllm.md"
    return None


@dataclass
class _Tokens:
    """What is kept of the meminject-loaded model once the plan is compiled."""

    name: str
    tokenizer: Any
    prepend_bos: bool


class VLLMModel:
    """A vLLM engine with memory plans installed in its workers: a default plan (what a
    request runs unless it names another) and any others requests name."""

    def __init__(self, llm: Any, tokens: _Tokens, source: str, load_seconds: float):
        self.llm = llm
        self._tokens = tokens
        self.name = tokens.name
        self.source = source
        #: Seconds ``vllm.LLM`` took to start (engine core, weights, KV cache).
        self.load_seconds = load_seconds
        #: The plans the workers hold, by digest.
        self.plans: dict[str, MemoryPlan] = {}
        #: The digest of the plan requests run unless they name another (None: none).
        self.default: str | None = None

    @property
    def plan(self) -> MemoryPlan | None:
        """The default plan."""
        return self.plans.get(self.default) if self.default else None

    def install(self, plan: MemoryPlan | None) -> None:
        """Make ``plan`` (None or empty: no memories) the engine's only memory set."""
        if plan:
            self._check(plan)
        self.plans = {}
        self.default = None
        if plan:
            self.default = self._key(plan)
            self.plans[self.default] = plan
        self._push()

    def _check(self, plan: MemoryPlan) -> None:
        """Refuse a plan the engine's parallel layout cannot run."""
        from meminject.vllm_backend.plan import UNSPLIT_SITES

        split = sorted({h["site"] for h in plan.hooks if h["site"] in UNSPLIT_SITES})
        parallel = self.llm.llm_engine.vllm_config.parallel_config
        if split and parallel.tensor_parallel_size > 1:
            raise BadInputError(
                f"memories at {', '.join(split)} do not run with tensor_parallel_size > 1 "
                "(the MLP's hidden activation is split across ranks)"
            )

    def _key(self, plan: MemoryPlan) -> str:
        digest = plan.digest()
        assert digest is not None  # a non-empty plan has one
        return digest

    def _push(self) -> None:
        hooks = [h for plan in self.plans.values() for h in plan.hooks]
        payloads = {key: plan.payload() for key, plan in self.plans.items()}
        counts = self.llm.collective_rpc("meminject_set", args=(payloads, self.default))
        if any(c != len(hooks) for c in counts):  # pragma: no cover - defensive
            raise RuntimeError(f"meminject: workers installed {counts} changes, not {len(hooks)}")

    def _route(self, plan: MemoryPlan | None) -> tuple[str, str | None]:
        """The ``extra_args`` key and the prefix-cache salt of a request that runs
        ``plan``, installing it in the workers first if they lack it."""
        if not plan:
            return "", None
        key = self._key(plan)
        if key not in self.plans:
            self._check(plan)
            self.plans[key] = plan
            self._push()
        return key, key

    def prompt_ids(self, prompt: str, chat: bool = False) -> list[int]:
        """The prompt's token ids, as meminject's own loop would feed them."""
        tok = self._tokens.tokenizer
        if chat:
            if not getattr(tok, "chat_template", None):
                raise BadInputError(
                    f"model '{self.name}' has no chat template in its tokenizer; drop --chat"
                )
            out = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return [int(t) for t in ids]
        ids = [int(t) for t in tok.encode(prompt, add_special_tokens=False)]
        if self._tokens.prepend_bos:
            if tok.bos_token_id is None:
                raise BadInputError(f"model '{self.name}' has no BOS token to prepend")
            ids = [int(tok.bos_token_id), *ids]
        if not ids:
            raise BadInputError("the prompt is empty (no tokens)")
        return ids

    def generate(
        self,
        prompts: list[str],
        options: DecodeOptions | list[DecodeOptions] | None = None,
        *,
        chat: bool = False,
        memories: list[MemoryPlan | None] | None = None,
    ) -> list[Generation]:
        """Generate a completion of each prompt in one vLLM batch (continuous batching
        decides the steps): with the default plan, or with ``memories[i]`` for prompt
        ``i`` (None or an empty plan: no memories), each request running its own set
        inside the shared steps."""

        from meminject.generation import DecodeOptions

        if options is None:
            options = DecodeOptions()
        per = options if isinstance(options, list) else [options] * len(prompts)
        if memories is not None and len(memories) != len(prompts):
            raise BadInputError(f"{len(memories)} memory choices for {len(prompts)} prompts")
        vocab = len(self._tokens.tokenizer)
        requests, params = [], []
        for i, (prompt, opt) in enumerate(zip(prompts, per, strict=True)):
            opt.check(vocab)
            if opt.max_new_tokens == 0:
                raise BadInputError("the vllm backend needs max_new_tokens >= 1")
            ids = self.prompt_ids(prompt, chat)
            request: dict[str, Any] = {"prompt_token_ids": ids}
            extra: dict[str, Any] | None = None
            salt = self.default
            if memories is not None:
                key, salt = self._route(memories[i])
                extra = {"meminject": key}
            if salt is not None:
                request["cache_salt"] = salt
            requests.append(request)
            params.append(sampling_params(opt, extra))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            self._generation(prompt, request["prompt_token_ids"], opt, out)
            for prompt, request, opt, out in zip(prompts, requests, per, outputs, strict=True)
        ]

    def _generation(self, prompt: str, ids: list[int], opt: DecodeOptions, out: Any) -> Generation:
        return to_generation(self._tokens.tokenizer, prompt, ids, opt, out)

    def close(self) -> None:
        """Shut the engine down (its processes end)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(
                getattr(engine, "engine_core", None), "shutdown", None
            )
            if shutdown is not None:
                shutdown()


def sampling_params(opt: DecodeOptions, extra: dict[str, Any] | None = None) -> Any:
    """vLLM's ``SamplingParams`` for meminject's decoding options, with ``extra`` as
    ``extra_args`` (the request's memory plan)."""
    from vllm import SamplingParams  # type: ignore[import-not-found,unused-ignore]

    # vLLM's logprobs are the model's own (before temperature and filters), as
    # meminject's are; the first step's also give the top next tokens.
    wanted = max(opt.logprobs or 0, opt.show_top)
    return SamplingParams(
        max_tokens=opt.max_new_tokens,
        temperature=opt.temperature,
        top_k=opt.top_k if opt.top_k > 0 else -1,
        top_p=opt.top_p,
        repetition_penalty=opt.repetition_penalty,
        seed=opt.seed,
        stop=list(opt.stop) or None,
        ignore_eos=not opt.stop_at_eos,
        logprobs=wanted if opt.logprobs is not None or opt.show_top else None,
        extra_args=extra,
    )


def to_generation(
    tokenizer: Any, prompt: str, ids: list[int], opt: DecodeOptions, out: Any
) -> Generation:
    """A finished vLLM ``RequestOutput`` as meminject's :class:`Generation` record."""
    import math

    from meminject.generation import Generation, TokenLogprob, TokenProb

    def token_str(token_id: int) -> str:
        return str(tokenizer.decode([token_id]))

    completion = out.outputs[0]
    reason = completion.finish_reason or "length"
    if reason == "stop":
        reason = "eos" if completion.stop_reason is None else "stop"
    if reason == "abort":
        reason = "cancelled"
    new_tokens = [int(t) for t in completion.token_ids]
    steps = completion.logprobs or []

    def ranked(step: Any, k: int) -> list[tuple[int, Any]]:
        ordered = sorted(step.items(), key=lambda kv: kv[1].rank or 0)
        return [(int(t), lp) for t, lp in ordered if lp.rank is not None and lp.rank <= k]

    top_next = []
    if opt.show_top and steps:
        top_next = [
            TokenProb(token_str(t), t, math.exp(lp.logprob))
            for t, lp in ranked(steps[0], opt.show_top)
        ]
    token_logprobs = []
    if opt.logprobs is not None:
        for token, step in zip(new_tokens, steps, strict=False):
            top = tuple(
                (token_str(t), t, float(lp.logprob)) for t, lp in ranked(step, opt.logprobs)
            )
            token_logprobs.append(
                TokenLogprob(token_str(token), token, float(step[token].logprob), top)
            )
    return Generation(
        prompt=prompt,
        completion=completion.text,
        prompt_tokens=list(ids),
        new_tokens=new_tokens,
        top_next=top_next,
        backend="vllm",
        finish_reason=reason,
        token_logprobs=token_logprobs,
    )


def prepare(model: LoadedModel, memories: MemorySet | None = None) -> tuple[_Tokens, str, str]:
    """What vLLM needs from a meminject-loaded model: the tokenizer and BOS rule (prompts
    are tokenized the meminject way), the checkpoint directory and the dtype name.
    Refuses a model vLLM would have to fetch, or whose decoder layers the worker does not
    know."""
    from meminject.dtypes import dtype_name
    from meminject.vllm_backend.plan import check_family

    source = Path(model.source)
    if not (source / "config.json").is_file():
        raise BadInputError(
            "the vllm backend loads a local Hugging Face directory (or a registered model "
            f"or GGUF file meminject dequantizes into one); '{model.source}' is not one"
        )
    config = json.loads((source / "config.json").read_text())
    check_family(config.get("model_type"), str(source))
    info = memories.model_info() if memories is not None else None
    tokens = _Tokens(model.name, model.tokenizer, model.prepend_bos_for(info))
    return tokens, str(source), dtype_name(model.dtype)


def start_engine(
    tokens: _Tokens, source: str, dtype: str, *, max_model_len: int = 512, **llm_options: Any
) -> VLLMModel:
    """Start ``vllm.LLM`` on ``source`` with meminject's worker extension (no memories
    installed yet: :meth:`VLLMModel.install`). ``enforce_eager`` is always on, since the
    memories' hooks run as Python outside any compiled graph."""
    reason = vllm_available()
    if reason is not None:
        raise BadInputError(reason)
    if llm_options.pop("enforce_eager", True) is not True:
        raise BadInputError("the vllm backend runs with enforce_eager=True (hooks are Python)")
    from vllm import LLM  # type: ignore[import-not-found,unused-ignore]

    started = time.perf_counter()
    llm = LLM(
        model=source,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=max_model_len,
        worker_extension_cls=WORKER_EXTENSION,
        **llm_options,
    )
    return VLLMModel(llm, tokens, source, time.perf_counter() - started)


def start_async_engine(source: str, dtype: str, **engine_options: Any) -> Any:
    """vLLM's ``AsyncLLM`` (the engine behind its OpenAI server) on ``source`` with
    meminject's worker extension, in eager mode; no plan installed (requests' plans are
    added with ``collective_rpc("meminject_add", …)``)."""
    reason = vllm_available()
    if reason is not None:
        raise BadInputError(reason)
    if engine_options.pop("enforce_eager", True) is not True:
        raise BadInputError("the vllm backend runs with enforce_eager=True (hooks are Python)")
    from vllm.engine.arg_utils import (  # type: ignore[import-not-found,unused-ignore]
        AsyncEngineArgs,
    )
    from vllm.v1.engine.async_llm import AsyncLLM  # type: ignore[import-not-found,unused-ignore]

    args = AsyncEngineArgs(
        model=source,
        dtype=dtype,
        enforce_eager=True,
        worker_extension_cls=WORKER_EXTENSION,
        **engine_options,
    )
    return AsyncLLM.from_engine_args(args)


def load_vllm(
    name_or_path: str | None = None,
    memories: Any = None,
    *,
    dtype: str = "float32",
    coordinates: str | None = None,
    prepend_bos: bool | None = None,
    allow_outside_paths: bool = False,
    max_model_len: int = 512,
    **llm_options: Any,
) -> VLLMModel:
    """A vLLM engine on ``name_or_path`` (a registered model, a Hugging Face directory or
    a GGUF file, as :func:`meminject.loading.load_model` takes) with ``memories`` (a
    set, paths or tables, as :func:`meminject.engine.compile_memories` takes) installed.

    The model loads once the meminject way to compile the set, and only the plan and the
    tokenizer are kept before vLLM loads its own copy. ``llm_options`` go to ``vllm.LLM``
    (``tensor_parallel_size``, ``gpu_memory_utilization``, ``enable_prefix_caching``…).
    Memories that cannot run are refused, one line each, before vLLM starts
    (:class:`~meminject.vllm_backend.plan.NotRunnable`).
    """
    import gc

    from meminject.loading import load_model
    from meminject.vllm_backend.plan import MemoryPlan, compile_plan

    reason = vllm_available()
    if reason is not None:
        raise BadInputError(reason)
    memory_set = None
    if memories is not None:
        from meminject.engine import as_memory_set

        memory_set = as_memory_set(memories)
    model = load_model(
        name_or_path,
        memories=memory_set,
        dtype=dtype,
        coordinates=coordinates,
        prepend_bos=prepend_bos,
    )
    tokens, source, dtype_used = prepare(model, memory_set)
    plan = (
        compile_plan(model, memory_set, allow_outside_paths=allow_outside_paths)
        if memory_set is not None
        else MemoryPlan()
    )
    del model
    gc.collect()
    loaded = start_engine(tokens, source, dtype_used, max_model_len=max_model_len, **llm_options)
    loaded.install(plan)
    return loaded


__all__ = [
    "WORKER_EXTENSION",
    "VLLMModel",
    "load_vllm",
    "prepare",
    "sampling_params",
    "start_async_engine",
    "start_engine",
    "to_generation",
    "vllm_available",
]
