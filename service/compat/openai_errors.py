"""OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``: the exception, its
handler, and native refusals said in OpenAI's terms (422 → 400, params renamed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from service.api_errors import ApiError

_NATIVE_TO_PARAM = {"num_images": "n", "width": "size", "height": "size"}


class OpenAIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code,
        )  # fmt: skip
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def from_native(exc: ApiError) -> OpenAIError:
    """A native refusal at submit in OpenAI's terms (422 → 400, params renamed)."""
    param = _NATIVE_TO_PARAM.get(exc.field or "", exc.field)
    message = exc.message
    if param != exc.field and message.startswith(f"{exc.field}: "):  # say it in OpenAI's terms
        rest = message[len(exc.field or "") + 2 :]
        message = (
            f"{param}: {rest}" if exc.field == "num_images" else f"{param}: {exc.field} {rest}"
        )
    if exc.status == 422:
        status = 404 if exc.code == "unknown_model" else 400
        code = "model_not_found" if exc.code == "unknown_model" else exc.code
        return OpenAIError(status, message, param=param, code=code)
    if exc.status == 429:
        return OpenAIError(429, exc.message, type_="requests", code=exc.code, headers=exc.headers)
    type_ = "server_error" if exc.status >= 500 else "invalid_request_error"
    return OpenAIError(exc.status, exc.message, type_=type_, code=exc.code, headers=exc.headers)


async def error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def invalid(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unavailable(retry_s: int) -> OpenAIError:
    return OpenAIError(503, "the job store is unreachable; retry shortly", type_="server_error",
                       code="service_unavailable", headers={"Retry-After": str(retry_s)})  # fmt: skip
