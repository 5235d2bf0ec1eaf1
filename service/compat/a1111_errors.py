"""A1111's error shape ``{"error", "detail", "body", "errors"}`` and its handler."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from fastapi.responses import JSONResponse

from service.api_errors import ApiError


class A1111Error(Exception):
    """An answer in A1111's error shape ``{"error", "detail", "body", "errors"}``."""

    def __init__(
        self, status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = dict(headers or {})


async def error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, A1111Error)
    body = {"error": exc.code, "detail": exc.detail, "body": "", "errors": exc.detail}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def from_native(exc: ApiError) -> A1111Error:
    return A1111Error(exc.status, exc.code, exc.message, exc.headers)


def unavailable(retry_s: int) -> A1111Error:
    retry = {"Retry-After": str(retry_s)}
    return A1111Error(503, "redis_unavailable", "the job store is unreachable", retry)
