"""One error shape for every answer: ``{"error": {"code", "message", "field"}}``.

Handlers here turn validation errors, unknown routes, an unreachable Redis and oversize
bodies into that shape with the right status, so bad input never becomes a 5xx.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.results.base import ResultStoreError

log = logging.getLogger(__name__)

# Redis answers that mean "the store cannot take this now", not "our bug": retry later.
# Inside a script the reply reads "Error running script ... -OOM command not allowed ...".
_TRANSIENT = re.compile(r"(?:^|[-\s])(OOM|MISCONF|READONLY|LOADING|MASTERDOWN|NOREPLICAS|BUSY)\b")
_LOCATIONS = {"body", "query", "path", "header", "cookie"}
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    """An error answer chosen by a route (status, stable code, message, field)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = dict(headers or {})


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """The JSON error body every handler answers with."""
    body: dict[str, Any] = {"code": code, "message": message, "field": field}
    body.update(extra or {})
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


def _field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = list(loc)
    if parts and parts[0] == "header" and len(parts) > 1:  # idempotency-key → Idempotency-Key
        parts[1] = "-".join(w.capitalize() for w in str(parts[1]).split("-"))
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or None


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return error_response(422, "validation_error", "invalid request")
    first = errors[0]
    field = _field(first.get("loc", ()))
    code = "invalid_json" if first.get("type") == "json_invalid" else "validation_error"
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    details = [
        {"field": _field(e.get("loc", ())), "message": str(e.get("msg")), "type": e.get("type")}
        for e in errors
    ]
    return error_response(422, code, message, field, extra={"details": details})


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


_BODY_UNPARSABLE = "There was an error parsing the body"  # FastAPI's words for undecodable bytes


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _BODY_UNPARSABLE:
        # Bytes that are not UTF-8 are malformed JSON too: same documented 422 as bad syntax.
        return error_response(422, "invalid_json", "body: not valid JSON (UTF-8 expected)", "body")
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


def _redis_down(retry_after_s: int) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable during %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "redis_unavailable",
            "the job store is unreachable; retry shortly",
            headers={"Retry-After": str(retry_after_s)},
        )

    return handler


def _redis_refused(retry_after_s: int) -> Any:
    unavailable = _redis_down(retry_after_s)

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        if _TRANSIENT.search(str(exc)):
            return await unavailable(request, exc)
        return await _unexpected(request, exc)

    return handler


def _results_down(retry_after_s: int) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        log.warning("result store unavailable during %s %s: %s", request.method,
                    request.url.path, exc)  # fmt: skip
        return error_response(
            503,
            "result_store_unavailable",
            "the result store is unreachable; retry shortly",
            headers={"Retry-After": str(retry_after_s)},
        )

    return handler


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI, redis_retry_after_s: int) -> None:
    """Route every failure through :func:`error_response`."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RedisConnectionError, _redis_down(redis_retry_after_s))
    app.add_exception_handler(RedisTimeoutError, _redis_down(redis_retry_after_s))
    app.add_exception_handler(RedisResponseError, _redis_refused(redis_retry_after_s))
    app.add_exception_handler(ResultStoreError, _results_down(redis_retry_after_s))
    app.add_exception_handler(Exception, _unexpected)


BODY_BYTES_SCOPE_KEY = "ldmserve.body_bytes"


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``, declared or streamed (chunked).

    Bodies are read up front (they are small JSON documents) and replayed to the app, so
    the limit holds even without a Content-Length header.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, larger: dict[tuple[str, str], int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # (method, path) -> limit for routes that take images; they see the body's size in
        # scope[BODY_BYTES_SCOPE_KEY] and hold image-less bodies to max_bytes themselves.
        self.larger = larger or {}

    async def _reject(
        self, scope: Scope, receive: Receive, send: Send, limit: int, bad_length: bool = False
    ) -> None:
        if bad_length:
            response = error_response(400, "bad_request", "invalid Content-Length header")
        else:
            response = error_response(
                413, "payload_too_large", f"request body exceeds {limit} bytes"
            )
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        limit = self.larger.get((scope["method"], scope["path"]), self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await self._reject(scope, receive, send, limit, bad_length=True)
            return
        if declared is not None and int(declared) > limit:
            await self._reject(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reject(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False
        scope[BODY_BYTES_SCOPE_KEY] = size

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
