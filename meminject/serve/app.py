"""The Starlette application behind ``meminject serve``: OpenAI's ``/v1/models``,
``/v1/completions`` and ``/v1/chat/completions`` (streaming by server-sent events,
``logprobs``), plus ``/v1/memories``. Every error is an OpenAI-style JSON body with
its status; nothing a request sends takes the server down."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from meminject import memfile
from meminject.errors import BadInputError, ContextTooLongError
from meminject.serve.batcher import Batcher, Job
from meminject.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    MemoryChoice,
    validation_error,
)

if TYPE_CHECKING:
    from meminject.generation import Generation, TokenLogprob
    from meminject.memfile import MemorySet
    from meminject.model_handle import LoadedModel

_FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length"}


class Server:
    """What the routes share: the model, the loaded memory set and the batcher."""

    def __init__(
        self,
        model: LoadedModel,
        memory_set: MemorySet | None,
        batcher: Batcher,
        *,
        served_name: str,
        api_key: str | None = None,
    ):
        self.model = model
        self.memory_set = memory_set
        self.batcher = batcher
        self.served_name = served_name
        self.api_key = api_key

    # -- requests ----------------------------------------------------------------

    def check(self, request: Request) -> None:
        if self.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(
                401,
                "a valid API key is needed (Authorization: Bearer KEY)",
                code="invalid_api_key",
            )

    async def body(self, request: Request, kind: type[Any]) -> Any:
        from pydantic import ValidationError

        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            parsed = kind.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if parsed.model not in (None, self.served_name):
            raise APIError(
                404,
                f"model '{parsed.model}' is not served here; this server serves "
                f"'{self.served_name}'",
                param="model",
                code="model_not_found",
            )
        return parsed

    def memories(self, choices: list[str | MemoryChoice] | None) -> tuple[Any, Any]:
        """The memory set a request chose, and a key for its compiled hooks."""
        if not choices:
            return None, ()
        picked = [
            memfile.MemoryChoice(c.name, c.tau, c.enabled)
            if isinstance(c, MemoryChoice)
            else memfile.MemoryChoice(c)
            for c in choices
        ]
        loaded = self.memory_set or memfile.MemorySet(())
        try:
            chosen = loaded.choose(picked)
        except memfile.UnknownMemoryError as exc:
            raise APIError(400, str(exc), param="memories", code="unknown_memory") from None
        except BadInputError as exc:
            raise APIError(400, str(exc), param="memories") from None
        key = tuple(sorted((c.name, c.tau, c.enabled) for c in picked))
        return chosen, key

    def job(self, prompt: Any, request: Any, max_tokens: int, logprobs: int | None) -> Job:
        from meminject.generation import DecodeOptions, prompt_ids

        options = DecodeOptions(
            max_new_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stops(),
            logprobs=logprobs,
        )
        try:
            options.check(self.model.dims.d_vocab)
            prompt_ids(self.model, prompt)  # too long, no chat template: refused here
        except BadInputError as exc:
            raise _bad_input(exc) from None
        memories, key = self.memories(request.memories)
        return Job(prompt, memories, key, options, asyncio.get_running_loop())

    # -- responses ---------------------------------------------------------------

    def visible(self, tokens: list[int]) -> str:
        eos = self.model.tokenizer.eos_token_id
        return self.model.decode([t for t in tokens if t != eos])

    async def stream(self, job: Job, chunk: Any, request: Any) -> AsyncIterator[str]:
        """Server-sent events: text deltas as tokens arrive, then the finish reason."""
        holdback = max((len(s) for s in request.stops()), default=1) - 1
        try:
            sent, tokens = "", []
            while (token := await job.tokens.get()) is not None:
                tokens.append(token)
                text = self.visible(tokens)
                safe = text[: len(text) - holdback] if holdback else text
                if safe.endswith("\ufffd"):  # half of a multi-byte character
                    continue
                if len(safe) > len(sent) and safe.startswith(sent):
                    yield _event(chunk(safe[len(sent) :], None))
                    sent = safe
            result = await job.done
            if result.completion.startswith(sent) and len(result.completion) > len(sent):
                yield _event(chunk(result.completion[len(sent) :], None))
            yield _event(chunk("", _FINISH.get(result.finish_reason, "length")))
            if request.include_usage():
                yield _event({**chunk("", None), "choices": [], "usage": _usage(result)})
            yield "data: [DONE]\n\n"
        except Exception as exc:
            yield _event({"error": _error_body(exc)["error"]})
        finally:
            job.cancelled = True  # a client gone frees its row at the next token


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error_body(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, APIError):
        return exc.body
    return APIError(500, f"{type(exc).__name__}: {exc}", kind="server_error").body


def _usage(result: Generation) -> dict[str, int]:
    prompt, new = len(result.prompt_tokens), len(result.new_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def _completion_logprobs(steps: list[TokenLogprob]) -> dict[str, Any]:
    offsets, at = [], 0
    for step in steps:
        offsets.append(at)
        at += len(step.token)
    return {
        "tokens": [s.token for s in steps],
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": [{t: lp for t, _, lp in s.top} for s in steps],
        "text_offset": offsets,
    }


def _chat_logprobs(steps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, _, lp in s.top]}
            for s in steps
        ]
    }


def create_app(server: Server) -> Starlette:
    async def handle(request: Request, run: Any) -> Response:
        try:
            server.check(request)
            return await run()
        except APIError as exc:
            return JSONResponse(exc.body, status_code=exc.status)
        except Exception as exc:  # a bug must not take the server down
            return JSONResponse(_error_body(exc), status_code=500)

    async def models(request: Request) -> Response:
        async def run() -> Response:
            entry = {"id": server.served_name, "object": "model", "created": 0}
            return JSONResponse({"object": "list", "data": [{**entry, "owned_by": "meminject"}]})

        return await handle(request, run)

    async def memories(request: Request) -> Response:
        async def run() -> Response:
            rows = []
            for entry in server.memory_set.entries if server.memory_set else []:
                m = entry.memory
                rows.append(
                    {
                        "name": entry.name,
                        "strategy": m.strategy,
                        "site": getattr(m, "resolved_site", getattr(m, "site", None)),
                        "layer": m.layer,
                        "tau": getattr(m, "tau", None),
                        "enabled": m.enabled,
                        "file": str(entry.file),
                    }
                )
            return JSONResponse({"object": "list", "data": rows})

        return await handle(request, run)

    async def completions(request: Request) -> Response:
        async def run() -> Response:
            body = await server.body(request, CompletionRequest)
            job = server.job(body.prompt, body, body.max_tokens, body.logprobs)
            server.batcher.submit(job)
            ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
            head = {"id": ident, "object": "text_completion", "created": created}
            head["model"] = server.served_name

            if body.stream:

                def chunk(text: str, finish: str | None) -> dict[str, Any]:
                    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                    return {**head, "choices": [choice]}

                return _sse(server.stream(job, chunk, body))
            result = await _wait(job)
            choice = {
                "index": 0,
                "text": result.completion,
                "finish_reason": _FINISH.get(result.finish_reason, "length"),
                "logprobs": (
                    _completion_logprobs(result.token_logprobs)
                    if body.logprobs is not None
                    else None
                ),
            }
            return JSONResponse({**head, "choices": [choice], "usage": _usage(result)})

        return await handle(request, run)

    async def chat(request: Request) -> Response:
        async def run() -> Response:
            body = await server.body(request, ChatRequest)
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            k = (body.top_logprobs or 0) if body.logprobs else None
            job = server.job(messages, body, body.new_tokens(4096 if body.stream else 256), k)
            server.batcher.submit(job)
            ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            head = {"id": ident, "created": created, "model": server.served_name}

            if body.stream:
                first = [True]

                def chunk(text: str, finish: str | None) -> dict[str, Any]:
                    delta: dict[str, Any] = {"content": text} if text or not finish else {}
                    if first[0]:
                        delta["role"], first[0] = "assistant", False
                    choice = {"index": 0, "delta": delta, "finish_reason": finish}
                    return {**head, "object": "chat.completion.chunk", "choices": [choice]}

                return _sse(server.stream(job, chunk, body))
            result = await _wait(job)
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.completion},
                "finish_reason": _FINISH.get(result.finish_reason, "length"),
                "logprobs": _chat_logprobs(result.token_logprobs) if body.logprobs else None,
            }
            return JSONResponse(
                {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(result)}
            )

        return await handle(request, run)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = f"no route {request.method} {request.url.path}"
        return JSONResponse(APIError(status, message).body, status_code=status)

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/memories", memories, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


async def _wait(job: Job) -> Generation:
    try:
        return await job.done
    except BadInputError as exc:
        raise _bad_input(exc) from None
    finally:
        job.cancelled = True  # the client gone (the handler cancelled): free the row


def _bad_input(exc: BadInputError) -> APIError:
    """The HTTP error for a request meminject refused, its status chosen by the
    exception's type: 413 for a prompt over the context, 400 otherwise."""
    return APIError(413 if isinstance(exc, ContextTooLongError) else 400, str(exc))


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")
