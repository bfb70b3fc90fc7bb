"""The HTTP routes: chat and text completions (JSON or server-sent events), models, health, metrics.

A completion request is translated (`runtime.serve.translate`), submitted to the engine in a worker thread (submit
validates synchronously: tokenizing, decoding media), then followed with ``handle.abatches()`` on the event loop (no
thread per request).  A stream's content events are its chunk rendered once per request through the pydantic
model with each piece's JSON string put in (`_text_events`), and the pieces the loop finds ready at one wake go out
in one write.  A client that goes away, while streaming or while waiting for a whole answer, has its request
cancelled (``handle.cancel()``): the server listens for the ASGI ``http.disconnect`` next to the generation, and a
stream closed for any other reason cancels too.  Engine failures become errors for that request only: before the first
byte as a JSON error (`runtime.serve.errors`), after it as an SSE ``data: {"error": ...}`` event.

Knows nothing of numpy or the backend: it talks to the engine through `Engine.submit` / `RequestHandle`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from runtime.serve.errors import APIError, error_body
from runtime.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from runtime.serve.translate import Submission, chat_submission, completion_submission

__all__ = ["router"]

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
_RESULT_TIMEOUT_S = 60.0  # handle.result() after the stream ended: the result is already there


def _completion_responses(model: type) -> dict:
    sse = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events, ended by "
                                                                              "`data: [DONE]`"}}}
    return {200: {"model": model, "content": sse}, **_ERRORS}


def _state(request: Request):
    return request.app.state.serve


class _SSEResponse(StreamingResponse):
    """Streams events and stops (cancelling the generator, whose cleanup cancels the request) the moment the client
    disconnects, whatever ASGI spec version the server speaks."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away between two events
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


@asynccontextmanager
async def _cancel_on_disconnect(request: Request, handle):
    """Cancel ``handle`` if the client disconnects while the body of this block runs."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


async def _submit(state, sub: Submission):
    from runtime.engine import Overloaded

    engine = state.engine
    if state.draining or not engine.ready:
        raise APIError(503, "the server is not ready or is shutting down; retry later", code="unavailable")
    try:
        return await anyio.to_thread.run_sync(lambda: engine.submit(
            sub.prompt, images=sub.images or None, audio=sub.audio or None, params=sub.params,
            max_soft_tokens=sub.max_soft_tokens))
    except Overloaded as e:
        retry = max(1, math.ceil(float(getattr(e, "retry_after", 1.0) or 1.0)))
        raise APIError(429, f"the server is overloaded ({e}); retry after {retry} s", code="overloaded",
                       headers={"Retry-After": str(retry)}) from None
    except ValueError as e:  # runtime.InputError: bad prompt, too long, undecodable media
        raise APIError(400, str(e), param=sub.field, code="invalid_input") from None
    except RuntimeError as e:  # the engine was shut down
        raise APIError(503, f"the engine is not accepting requests ({e})", code="unavailable") from None


async def _batches(state, handle, t_submit: float) -> AsyncIterator[list[Any]]:
    """``handle.abatches()`` (the pieces that arrived since the loop last looked), timing the first token and the
    gaps between tokens as this loop sees them."""
    metrics, last = state.metrics, None
    async with aclosing(handle.abatches()) as batches:
        async for batch in batches:
            now = time.monotonic()
            for piece in batch:
                if piece.token >= 0:
                    if last is None:
                        metrics.ttft.observe(now - t_submit)
                    else:
                        metrics.itl.observe(now - last)
                    last = now
            yield batch


async def _result(state, handle):
    """The finished result; a failed or server-cancelled request raises `APIError` (500 / 503)."""
    from runtime.engine import RequestFailed

    try:
        result = await anyio.to_thread.run_sync(lambda: handle.result(timeout=_RESULT_TIMEOUT_S))
    except RequestFailed as e:
        raise APIError(500, f"the engine failed this request: {getattr(e, 'reason', e)}", code="request_failed") from None
    if result.finish_reason not in ("stop", "length"):
        raise APIError(503, f"the request was {result.finish_reason} (the server is shutting down)", code="unavailable")
    state.metrics.prompt_tokens.inc(result.prompt_tokens)
    state.metrics.generated_tokens.inc(len(result.tokens))
    return result


def _usage(result) -> Usage:
    n = len(result.tokens)
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=n, total_tokens=result.prompt_tokens + n)


def _sse(obj: Any) -> str:
    body = obj.model_dump() if hasattr(obj, "model_dump") else obj
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


_json_str = json.JSONEncoder(ensure_ascii=False).encode  # a str's JSON literal as `_sse`'s json.dumps writes it
_MARK = "\x00piece\x00"  # a text no piece has: a NUL is written as \u0000


def _text_events(chunk) -> Callable[[str], str]:
    """``text -> _sse(chunk(text=text))`` without a model per token: the request's content chunk is built, validated
    and dumped once through its pydantic model with a marker for the text; each piece's event is then that event's
    two halves around the piece's JSON string (the same bytes; ``tests/test_serve_http.py`` compares them)."""
    head, mark, tail = _sse(chunk(text=_MARK)).partition(_json_str(_MARK))
    if not mark or _json_str(_MARK) in tail:
        raise RuntimeError(f"the content chunk does not carry its text once: {head}{mark}{tail!r}")
    return lambda text: f"{head}{_json_str(text)}{tail}"


async def _events(state, handle, sub: Submission, t_submit: float, chunk) -> AsyncIterator[str]:
    """The SSE events of one request; ``chunk(text=..., finish=..., usage=..., first=...)`` makes each event's object.
    Leaving early (client gone, server cancelling the task) cancels the request."""
    from runtime.engine import RequestFailed

    try:
        if (head := chunk(first=True)) is not None:
            yield _sse(head)
        text_event = _text_events(chunk)
        async with aclosing(_batches(state, handle, t_submit)) as batches:
            async for batch in batches:  # the pieces ready at one wake of the loop: one write
                if events := [text_event(p.text) for p in batch if p.text]:
                    yield "".join(events)
        result = await _result(state, handle)
        yield _sse(chunk(finish=result.finish_reason))
        if sub.include_usage:
            yield _sse(chunk(usage=_usage(result)))
    except RequestFailed as e:
        yield _sse(error_body(f"the engine failed this request: {getattr(e, 'reason', e)}", type="server_error",
                              code="request_failed"))
    except APIError as e:
        yield _sse(error_body(e.message, type=e.type, param=e.param, code=e.code))
    finally:
        if handle.finish_reason is None:
            handle.cancel()
    yield "data: [DONE]\n\n"


async def _run(request: Request, sub: Submission, respond, chunk) -> Response:
    state = _state(request)
    t_submit = time.monotonic()
    handle = await _submit(state, sub)
    if sub.stream:
        return _SSEResponse(_events(state, handle, sub, t_submit, chunk),
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    from runtime.engine import RequestFailed

    outcome: Any = None
    try:
        async with _cancel_on_disconnect(request, handle):
            try:
                async with aclosing(_batches(state, handle, t_submit)) as batches:
                    async for _ in batches:
                        pass
                outcome = await _result(state, handle)
            except Exception as e:  # noqa: BLE001 - raised below, outside the task group (no ExceptionGroup)
                outcome = e
    finally:
        if handle.finish_reason is None:
            handle.cancel()
    if isinstance(outcome, RequestFailed):
        raise APIError(500, f"the engine failed this request: {getattr(outcome, 'reason', outcome)}",
                       code="request_failed")
    if isinstance(outcome, Exception):
        raise outcome
    return JSONResponse(respond(outcome).model_dump())


def _ids(kind: str) -> tuple[str, int]:
    return f"{kind}-{uuid.uuid4().hex}", int(time.time())


def _chat_chunks(rid: str, created: int, name: str):
    """``chunk(text=..., finish=..., usage=..., first=...)`` -> one `ChatCompletionChunk` of this request."""

    def chunk(text=None, finish=None, usage=None, first=False) -> ChatCompletionChunk:
        if usage is not None:
            return ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=usage)
        delta = Delta(role="assistant", content="") if first else Delta(content=text)
        return ChatCompletionChunk(id=rid, created=created, model=name,
                                   choices=[ChunkChoice(index=0, delta=Delta() if finish else delta,
                                                        finish_reason=finish)])

    return chunk


def _completion_chunks(rid: str, created: int, name: str):
    """The same for text completions (streamed as `Completion` objects; no role chunk)."""

    def chunk(text=None, finish=None, usage=None, first=False) -> Completion | None:
        if first:
            return None
        if usage is not None:
            return Completion(id=rid, created=created, model=name, choices=[], usage=usage)
        return Completion(id=rid, created=created, model=name,
                          choices=[CompletionChoice(index=0, text=text or "", finish_reason=finish)])

    return chunk


@router.post("/v1/chat/completions", response_model=None, responses=_completion_responses(ChatCompletion))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI chat completions (text, images as data: URLs, WAV audio), streamed as server-sent events on request."""
    state = _state(request)
    if state.engine.model.tokenizer is None:
        raise APIError(400, "this artifact has no tokenizer, so it cannot take chat messages; use /v1/completions "
                            "with a list of token ids", param="messages")
    sub = chat_submission(body, state.ctx)
    rid, created = _ids("chatcmpl")
    name = state.ctx.model_name

    def respond(result) -> ChatCompletion:
        choice = ChatChoice(index=0, message=AssistantMessage(content=result.text or ""),
                            finish_reason=result.finish_reason)
        return ChatCompletion(id=rid, created=created, model=name, choices=[choice], usage=_usage(result))

    return await _run(request, sub, respond, _chat_chunks(rid, created, name))


@router.post("/v1/completions", response_model=None, responses=_completion_responses(Completion))
async def completions(body: CompletionRequest, request: Request) -> Response:
    """OpenAI (legacy) text completions: a prompt string or a list of token ids, no chat template."""
    state = _state(request)
    sub = completion_submission(body, state.ctx)
    rid, created = _ids("cmpl")
    name = state.ctx.model_name

    def respond(result) -> Completion:
        choice = CompletionChoice(index=0, text=result.text or "", finish_reason=result.finish_reason)
        return Completion(id=rid, created=created, model=name, choices=[choice], usage=_usage(result))

    return await _run(request, sub, respond, _completion_chunks(rid, created, name))


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    return ModelList(data=[ModelCard(id=state.ctx.model_name, created=state.created)])


@router.get("/v1/models/{model}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model: str, request: Request) -> ModelCard:
    state = _state(request)
    if model != state.ctx.model_name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {state.ctx.model_name!r}",
                       param="model", code="model_not_found")
    return ModelCard(id=state.ctx.model_name, created=state.created)


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(request: Request) -> JSONResponse:
    """200 once the engine is started and ready; 503 before that and while draining."""
    state = _state(request)
    if state.draining:
        raise APIError(503, "the server is shutting down", code="draining")
    if not state.engine.ready:
        raise APIError(503, "the engine is not ready yet", code="unavailable")
    return JSONResponse({"status": "ok", **state.engine.stats()})


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, 401: _ERRORS[401]})
async def metrics(request: Request) -> Response:
    body, content_type = _state(request).metrics.exposition()
    return Response(body, media_type=content_type)
