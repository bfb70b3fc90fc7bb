"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and the status each one gets.

| cause                                                             | status | type / code                        |
|-------------------------------------------------------------------|--------|------------------------------------|
| malformed JSON, wrong types, missing fields (pydantic), bad values | 400    | invalid_request_error              |
| an unsupported parameter (``tools``, ``n`` > 1, ``logprobs``...)   | 400    | invalid_request_error / unsupported_parameter |
| `runtime.InputError` (too long a prompt, undecodable image/audio)  | 400    | invalid_request_error              |
| a media URL that is not allowed (http, https, file outside DIR)    | 400    | invalid_request_error / invalid_url |
| missing or wrong API key                                           | 401    | authentication_error / invalid_api_key |
| unknown ``model`` (as OpenAI does)                                 | 404    | invalid_request_error / model_not_found |
| unknown route                                                      | 404    | invalid_request_error / not_found   |
| body larger than ``max_body_bytes``                                | 413    | invalid_request_error / request_too_large |
| engine queue full (`Overloaded`), with ``Retry-After``             | 429    | rate_limit_error / overloaded       |
| engine failed the request (`RequestFailed`), any other exception   | 500    | server_error                        |
| engine not started, or draining (shutting down)                    | 503    | server_error / unavailable          |

Every message names the field (``messages[0].content``) or the problem; ``param`` holds the field path when there is
one.  This module knows nothing about the engine or the routes.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

__all__ = ["APIError", "error_body", "error_response", "field_path"]


class APIError(Exception):
    """A request that fails with ``status``; raised anywhere in a route and turned into the OpenAI error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _default_type(status)
        self.headers = headers or {}


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, type=err.type, param=err.param, code=err.code),
                        status_code=err.status, headers=err.headers)


def field_path(loc: tuple | list) -> str:
    """pydantic's error location as a field path: ``("body", "messages", 0, "content")`` -> ``messages[0].content``.

    Locations of union members (``str``, ``list[...]``) are left out: they name a type, not a field the client
    wrote."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part in _TYPE_NAMES or part.startswith(_TYPE_PREFIXES)):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


# The names pydantic gives the members of a union (``str | list[int]``); our models have no fields of these names.
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
_TYPE_PREFIXES = ("list[", "dict[", "function-", "literal[")
