"""`create_app(engine, ...)`: the FastAPI application over an engine, with its middleware and error handlers.

Middleware, outermost first (plain ASGI, so the streaming routes still see the client's disconnect):
- metrics: counts every answered request by route template and status;
- body limit: a body over ``max_body_bytes`` gets 413 before any route parses it;
- auth: with an ``api_key``, every ``/v1`` route and ``/metrics`` needs ``Authorization: Bearer <key>`` (compared in
  constant time); ``/health`` stays open.

The lifespan starts the engine (in a worker thread) if it is not ready, and on shutdown marks the server as draining
(``/health`` answers 503) and calls ``engine.shutdown(drain_timeout=...)``.  Every error is OpenAI's error shape
(`runtime.serve.errors`); validation errors are 400 (not FastAPI's 422) and the OpenAPI schema says so.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.generation_config import read_generation_config
from runtime.images import SUPPORTED_SOFT_TOKEN_BUDGETS
from runtime.serve.chat import ChatRenderer
from runtime.serve.errors import APIError, error_response, field_path
from runtime.serve.metrics import Metrics
from runtime.serve.routes import router
from runtime.serve.translate import ServeContext

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

DEFAULT_MAX_BODY_BYTES = 32 << 20  # a few high-detail images as base64


@dataclass
class ServeState:
    engine: Any
    ctx: ServeContext
    metrics: Metrics
    drain_timeout: float
    created: int
    draining: bool = False


def create_app(engine: Any, *, model_name: str, api_key: str | None = None, max_soft_tokens: int = 280,
               allow_media_dir: str | Path | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               drain_timeout: float = 30.0) -> FastAPI:
    """The OpenAI-compatible app over ``engine`` (a `runtime.engine.Engine`, started or not)."""
    from runtime.engine import SamplingParams  # the engine's own types; imported when an app is made

    if max_soft_tokens not in SUPPORTED_SOFT_TOKEN_BUDGETS:
        raise ValueError(f"max_soft_tokens={max_soft_tokens}; expected one of {SUPPORTED_SOFT_TOKEN_BUDGETS}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes}; expected a positive number of bytes")
    media_dir = None
    if allow_media_dir is not None:
        media_dir = Path(allow_media_dir).resolve()
        if not media_dir.is_dir():
            raise ValueError(f"allow_media_dir={str(allow_media_dir)!r} is not a directory")
    model = engine.model
    ctx = ServeContext(model_name=model_name, renderer=ChatRenderer.for_model(model),
                       defaults=read_generation_config(model), sampling_params=SamplingParams, max_len=model.max_len,
                       max_soft_tokens=max_soft_tokens, allow_media_dir=media_dir, max_media_bytes=max_body_bytes)
    state = ServeState(engine, ctx, Metrics(engine), drain_timeout, int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.draining = False
        if not engine.ready:
            await anyio.to_thread.run_sync(engine.start)
        try:
            yield
        finally:
            state.draining = True
            await anyio.to_thread.run_sync(lambda: engine.shutdown(drain_timeout=state.drain_timeout))

    app = FastAPI(title="Gemma 4 OpenAI-compatible server", version="1", lifespan=lifespan)
    app.state.serve = state
    app.include_router(router)
    _add_error_handlers(app)
    app.add_middleware(_Auth, api_key=api_key)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_CountRequests, metrics=state.metrics)
    _openapi_without_422(app)
    return app


# ---- errors ----------------------------------------------------------------------------------------------------


def _validation_message(err: dict) -> tuple[str, str | None]:
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", None
    path = field_path(err.get("loc", ()))
    if not path:
        return f"the body must be a JSON object of the request's fields ({err.get('msg')})", None
    return f"{path}: {err.get('msg')}", path


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        # The deepest error is the most specific: a bad part of a list beats "not a string" of a str | list union.
        first = max(errors, key=lambda e: len(e.get("loc", ())), default=None)
        message, param = _validation_message(first) if first else ("invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return error_response(APIError(500, f"internal error ({type(exc).__name__}); the request failed, the server "
                                            "keeps serving", code="internal_error"))


def _openapi_without_422(app: FastAPI) -> None:
    """Our validation errors are 400 (OpenAI's convention); drop FastAPI's documented 422."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


# ---- middleware ------------------------------------------------------------------------------------------------


async def _send_error(send, err: APIError) -> None:
    await error_response(err)({"type": "http"}, _no_receive, send)


async def _no_receive():  # pragma: no cover - a JSONResponse never reads
    return {"type": "http.disconnect"}


class _CountRequests:
    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(route=getattr(route, "path", "unmatched"), status=str(status[0])).inc()


class _BodyLimit:
    """Reads the body up to ``max_bytes`` (413 past it) and replays it to the app; later receives (the disconnect)
    go to the server."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                             code="request_too_large")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_error(send, too_large)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class _Auth:
    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if self.key is not None and (path == "/v1" or path.startswith("/v1/") or path == "/metrics"):
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await _send_error(send, err)
        await self.app(scope, receive, send)
