"""The Starlette application behind ``meminject serve``: OpenAI's ``/v1/models``,
``/v1/completions`` and ``/v1/chat/completions`` (streaming by server-sent events,
``logprobs``), plus ``/v1/memories``. Every error is an OpenAI-style JSON body with
its status; nothing a request sends takes the server down or slows the others.

The clients of one server do not trust each other (nor do the web pages their browsers
open), so:

* the event loop only moves bytes: parsing JSON, validating, tokenizing and chat
  templating run on a small thread pool, and a body is at most :data:`MAX_BODY` bytes
  (checked on ``Content-Length`` and again while it streams in, 413) and must arrive
  within :data:`BODY_TIMEOUT_S` (408);
* a prompt far longer than the context (over :data:`CHARS_PER_TOKEN` characters per
  context token) is refused before the tokenizer sees it (413);
* every request must name a trusted ``Host`` (DNS rebinding), come from no foreign
  ``Origin`` (403) and, when it has a body, say ``Content-Type: application/json``
  (415): a web page can send neither without a CORS preflight, which is not answered;
* statuses are chosen by exception type (:func:`api_error`), the same for a streamed
  request as for a plain one; a 5xx body names a request id, never an exception or a
  path, and the log has the traceback under that id;
* a plain request whose client disconnects is cancelled, as a stream is.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from meminject import memfile
from meminject.errors import (
    BadInputError,
    ContextTooLongError,
    MemoryFileError,
    NonFiniteScoresError,
    shorten,
)
from meminject.serve.batcher import Batcher, Job
from meminject.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    MemoryChoice,
    validation_error,
)

if TYPE_CHECKING:
    from meminject.generation import Generation, Prompt, TokenLogprob
    from meminject.memfile import MemorySet
    from meminject.model_handle import LoadedModel
    from meminject.serve.vllm_jobs import VLLMJobs

log = logging.getLogger("meminject.serve")

_FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length"}
#: The largest request body, in bytes.
MAX_BODY = 1 << 20
#: How long a request body may take to arrive, in seconds.
BODY_TIMEOUT_S = 30.0
#: A prompt of more characters than this many per context token cannot fit, whatever
#: the tokenizer (tokens of more characters are rare), so it is refused untokenized.
CHARS_PER_TOKEN = 32
#: Hosts a request may name besides ``--host`` and ``--trusted-host``.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class Server:
    """What the routes share: the model, the loaded memory set and the batcher."""

    def __init__(
        self,
        model: LoadedModel,
        memory_set: MemorySet | None,
        batcher: Batcher | VLLMJobs,
        *,
        served_name: str,
        api_key: str | None = None,
        trusted_hosts: Collection[str] = LOCAL_HOSTS,
        memory_roots: Sequence[Path | str] = (),
    ):
        from meminject.engine import added_scales

        if api_key is not None and not api_key:
            raise BadInputError("the API key is empty; give a key or none (no auth)")
        self.model = model
        self.memory_set = memory_set
        self.batcher = batcher
        self.served_name = served_name
        self.api_key = api_key
        self.trusted_hosts = {h.lower().strip("[]") for h in trusted_hosts}
        self.memory_roots = [Path(p).resolve() for p in memory_roots]
        #: Each add memory's largest |v| component, to refuse a non-finite τ·v early.
        self.scales = added_scales(model, memory_set) if memory_set is not None else {}
        #: Parsing, validation and tokenizing: off the event loop, one at a time per
        #: thread (tokenizers are not shared between these threads at once).
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="meminject-parse")

    # -- requests ----------------------------------------------------------------

    def check(self, request: Request) -> None:
        """The bearer key, compared in constant time; the scheme in any case."""
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if not (
            scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), self.api_key.encode())
        ):
            raise APIError(
                401,
                "a valid API key is needed (Authorization: Bearer KEY)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="meminject"'},
            )

    def trusted(self, host: str | None) -> bool:
        if "*" in self.trusted_hosts:
            return True
        if not host:
            return False
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:
            return False
        return name is not None and name in self.trusted_hosts

    async def body(self, request: Request, kind: type[Any]) -> Any:
        raw = await read_body(request)
        parsed = await self.off_loop(_parse, raw, kind)
        if parsed.model not in (None, self.served_name):
            raise APIError(
                404,
                f"model '{shorten(parsed.model)}' is not served here; this server serves "
                f"'{self.served_name}'",
                param="model",
                code="model_not_found",
            )
        return parsed

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

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
        for choice in picked:
            if choice.tau is not None:
                self.check_tau(choice.name, choice.tau)
        return chosen, chosen.choice_key()

    def check_tau(self, name: str, tau: float) -> None:
        """Refuse a τ whose τ·v is not finite in the model's dtype (or in float32, where
        it is computed) before the request is queued."""
        import torch

        if name not in self.scales:
            return
        largest = min(torch.finfo(self.model.dtype).max, torch.finfo(torch.float32).max)
        scale = self.scales[name]
        if (
            abs(tau) >= largest
            or not math.isfinite(abs(tau) * scale)
            or (abs(tau) * scale >= largest)
        ):
            raise APIError(
                400,
                f"memory '{name}': τ·v is not finite in {str(self.model.dtype).split('.')[-1]} "
                f"(τ = {tau:g}, largest |v| = {scale:g}); use a smaller tau",
                param="memories",
            )

    async def job(
        self, prompt: Prompt, request: Any, max_tokens: int, logprobs: int | None, rid: str
    ) -> Job:
        from meminject.generation import DecodeOptions

        options = DecodeOptions(
            max_new_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stops(),
            logprobs=logprobs,
        )
        memories, key = self.memories(request.memories)
        await self.off_loop(self.check_prompt, prompt, options)
        return Job(prompt, memories, key, options, asyncio.get_running_loop(), rid)

    def check_prompt(self, prompt: Prompt, options: Any) -> None:
        """Options against the vocabulary, and the prompt against the context: far too
        long before tokenizing, else after (no chat template is refused here too)."""
        from meminject.generation import prompt_ids

        options.check(self.model.dims.d_vocab)
        n_ctx = self.model.dims.n_ctx
        chars = (
            len(prompt)
            if isinstance(prompt, str)
            else sum(len(m.get("content", "")) for m in prompt)
        )
        if chars > CHARS_PER_TOKEN * n_ctx:
            raise ContextTooLongError(
                f"the prompt has {chars} characters, far more than fit in the model's "
                f"context of {n_ctx} tokens"
            )
        prompt_ids(self.model, prompt)

    def file_shown(self, file: Path) -> str:
        """A memory file as ``/v1/memories`` shows it: relative to the ``-m`` directory
        it was found in, else its name; the server's own paths are not a client's."""
        resolved = Path(file).resolve()
        for root in self.memory_roots:
            if root.is_dir() and resolved.is_relative_to(root):
                return resolved.relative_to(root).as_posix()
        return resolved.name

    # -- responses ---------------------------------------------------------------

    async def stream(
        self, job: Job, chunk: Any, request: Any, first: int | None
    ) -> AsyncIterator[str]:
        """Server-sent events: text deltas as tokens arrive, then the finish reason.
        Text is decoded incrementally (each token once, with one token of context), and
        as many characters as the longest stop string are held back."""
        holdback = max((len(s) for s in request.stops()), default=1) - 1
        decoder = _Incremental(self, self.model.tokenizer.eos_token_id)
        try:
            sent = ""
            token = first
            while token is not None:
                text = decoder.push(token)
                safe = text[: len(text) - holdback] if holdback else text
                if len(safe) > len(sent):
                    yield _event(chunk(safe[len(sent) :], None))
                    sent = safe
                token = await job.tokens.get()
            result = await job.done
            if result.completion.startswith(sent) and len(result.completion) > len(sent):
                yield _event(chunk(result.completion[len(sent) :], None))
            yield _event(chunk("", _FINISH.get(result.finish_reason, "length")))
            if request.include_usage():
                yield _event({**chunk("", None), "choices": [], "usage": _usage(result)})
            yield "data: [DONE]\n\n"
        except Exception as exc:
            yield _event({"error": api_error(exc, job.request_id).body["error"]})
        finally:
            job.cancelled = True  # a client gone frees its row at the next token


class _Incremental:
    """A completion's text as its tokens arrive, decoding each token once: the text of
    the tokens since the last emitted boundary, with the token before it as context
    (SentencePiece drops a leading space without it), is compared with the text of the
    context alone. O(n) over a stream, where decoding everything at each token is
    O(n²)."""

    def __init__(self, server: Server, eos: int | None):
        self.decode = server.model.decode
        self.eos = eos
        self.tokens: list[int] = []
        self.prefix = 0  # tokens[prefix:read] decode to the context
        self.read = 0
        self.text = ""

    def push(self, token: int) -> str:
        if token == self.eos:
            return self.text
        self.tokens.append(token)
        before = self.decode(self.tokens[self.prefix : self.read])
        after = self.decode(self.tokens[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
        return self.text


def _parse(raw: bytes, kind: type[Any]) -> Any:
    """A body as ``kind`` (on the thread pool): JSON, an object, the fields' types."""
    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValidationError as exc:
        raise validation_error(exc) from None


async def read_body(request: Request) -> bytes:
    """The body, if it is JSON, at most :data:`MAX_BODY` bytes and in time."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(
            415,
            "the body must be JSON sent with 'Content-Type: application/json'",
            code="unsupported_media_type",
        )
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise APIError(400, "the Content-Length header is not a number")
        if int(length) > MAX_BODY:
            raise _too_large()

    async def gather() -> bytes:
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY:
                raise _too_large()
            parts.append(part)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(gather(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise APIError(
            408, f"the body did not arrive within {BODY_TIMEOUT_S:g} s", code="timeout"
        ) from None


def _too_large() -> APIError:
    return APIError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")


def api_error(exc: BaseException, request_id: str) -> APIError:
    """The HTTP error for an exception, chosen by its type (never by its message): the
    request's own mistakes are 4xx with their one-line message (a memory file's
    location is the server's business and left out); anything else is a 500 that
    names the request id the log holds the details under."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextTooLongError):
        return APIError(413, str(exc), code="context_length_exceeded")
    if isinstance(exc, NonFiniteScoresError):
        return APIError(400, str(exc), param="memories", code="non_finite_scores")
    if isinstance(exc, MemoryFileError):
        where = exc.location
        parts = [f"memory {where.memory}" if where.memory else None]
        parts.append(f"field '{where.field}'" if where.field else None)
        prefix = ": ".join(p for p in parts if p)
        message = f"{prefix}: {exc.message}" if prefix else exc.message
        return APIError(400, str(BadInputError(message)), param="memories")
    if isinstance(exc, BadInputError):
        return APIError(400, str(exc))
    log.error("request %s failed", request_id, exc_info=exc)
    return APIError(
        500,
        f"the server failed on this request (request id {request_id}); its log has the details",
        kind="server_error",
        code="internal_error",
    )


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


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


class _Gone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(server: Server) -> Any:
    """The ASGI application: the routes behind the Host and Origin check."""

    async def handle(request: Request, run: Callable[[str], Awaitable[Response]]) -> Response:
        rid = f"req-{uuid.uuid4().hex[:16]}"
        try:
            server.check(request)
            response = await run(rid)
        except _Gone:
            return Response(status_code=499)
        except Exception as exc:  # a bug must not take the server down
            error = api_error(exc, rid)
            response = JSONResponse(error.body, status_code=error.status, headers=error.headers)
        response.headers["X-Request-Id"] = rid
        return response

    async def models(request: Request) -> Response:
        async def run(rid: str) -> Response:
            entry = {"id": server.served_name, "object": "model", "created": 0}
            return JSONResponse({"object": "list", "data": [{**entry, "owned_by": "meminject"}]})

        return await handle(request, run)

    async def memories(request: Request) -> Response:
        async def run(rid: str) -> Response:
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
                        "file": server.file_shown(entry.file),
                    }
                )
            return JSONResponse({"object": "list", "data": rows})

        return await handle(request, run)

    async def respond(
        request: Request, job: Job, body: Any, chunk: Any, answer: Callable[[Generation], Any]
    ) -> Response:
        """Queue the job; stream it, or wait for it (cancelling it if the client
        leaves). A stream waits for its first token first, so an error before any
        text (a memory that does not compile, scores non-finite at once) is answered
        with its own status, as a plain request's is."""
        server.batcher.submit(job)
        if body.stream:
            first = await _until(job, request, job.tokens.get())
            if first is None:
                await job.done  # an error before any token is raised here
            return StreamingResponse(
                server.stream(job, chunk, body, first), media_type="text/event-stream"
            )
        result = await _until(job, request, job.done)
        return JSONResponse(answer(result))

    async def completions(request: Request) -> Response:
        async def run(rid: str) -> Response:
            body = await server.body(request, CompletionRequest)
            job = await server.job(body.prompt, body, body.max_tokens, body.logprobs, rid)
            ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
            head = {"id": ident, "object": "text_completion", "created": created}
            head["model"] = server.served_name

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                return {**head, "choices": [choice]}

            def answer(result: Generation) -> dict[str, Any]:
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
                return {**head, "choices": [choice], "usage": _usage(result)}

            return await respond(request, job, body, chunk, answer)

        return await handle(request, run)

    async def chat(request: Request) -> Response:
        async def run(rid: str) -> Response:
            body = await server.body(request, ChatRequest)
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            k = (body.top_logprobs or 0) if body.logprobs else None
            new = body.new_tokens(4096 if body.stream else 256)
            job = await server.job(messages, body, new, k, rid)
            ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            head = {"id": ident, "created": created, "model": server.served_name}
            first = [True]

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                delta: dict[str, Any] = {"content": text} if text or not finish else {}
                if first[0]:
                    delta["role"], first[0] = "assistant", False
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            def answer(result: Generation) -> dict[str, Any]:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.completion},
                    "finish_reason": _FINISH.get(result.finish_reason, "length"),
                    "logprobs": _chat_logprobs(result.token_logprobs) if body.logprobs else None,
                }
                return {
                    **head,
                    "object": "chat.completion",
                    "choices": [choice],
                    "usage": _usage(result),
                }

            return await respond(request, job, body, chunk, answer)

        return await handle(request, run)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = f"no route {request.method} {shorten(request.url.path)}"
        return JSONResponse(APIError(status, message).body, status_code=status)

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/memories", memories, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    return _Guard(app, server)


class _Guard:
    """ASGI middleware in front of every route: the ``Host`` must be trusted (a page
    that rebinds its own DNS name to 127.0.0.1 still sends its own name) and a browser's
    ``Origin``, when sent, must be one of those hosts too (a cross-site request)."""

    def __init__(self, app: Any, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = None
        if not self.server.trusted(headers.get("host")):
            error = APIError(
                400,
                "the Host header names a host this server does not answer for; start it "
                "with --trusted-host NAME to add one",
                code="untrusted_host",
            )
        elif "origin" in headers and not self.server.trusted(
            urlsplit(headers["origin"]).netloc or None
        ):
            error = APIError(403, "cross-origin requests are refused", code="forbidden_origin")
        if error is None:
            await self.app(scope, receive, send)
            return
        await JSONResponse(error.body, status_code=error.status)(scope, receive, send)


async def _until(job: Job, request: Request, waiting: Awaitable[Any]) -> Any:
    """``waiting``'s result, unless the client disconnects first: then the job is
    cancelled (skipped if queued, its row ended at the next token if running)."""
    task = asyncio.ensure_future(waiting)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            job.cancelled = True
            task.cancel()
            raise _Gone
        return task.result()
    finally:
        gone.cancel()
        if not job.done.done() and not task.done():
            job.cancelled = True


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body was read, so the next message the
    server receives is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
