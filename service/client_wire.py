"""How the client reads the server's answers: errors by status, which answers are retried
and after how long, Server-Sent Events decoded into the typed events of
:mod:`service.client_models`.

429 and 503 are retried for reads, and for submits only when they carry an
``Idempotency-Key`` (so a retry can never queue the same job twice).
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx

from service.client_models import (
    ERROR_BY_STATUS,
    ApiError,
    DoneEvent,
    Event,
    Job,
    JobEvent,
    PreviewEvent,
    ProgressEvent,
    Unavailable,
)

_RETRY_STATUSES = frozenset({429, 503})


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    cls = ERROR_BY_STATUS.get(response.status_code, ApiError)
    raise cls(
        response.status_code,
        str(error.get("code") or f"http_{response.status_code}"),
        str(error.get("message") or response.text[:200]),
        error.get("field"),
        _retry_after(response),
    )


def retry_delay(attempt: int, response: httpx.Response, base: float, cap: float) -> float:
    """Retry-After when given, else exponential backoff with jitter."""
    after = _retry_after(response)
    if after is not None:
        return min(after, cap)
    return min(cap, base * 2**attempt) * (0.5 + random.random() / 2)


def retryable(method: str, headers: dict[str, str], response: httpx.Response) -> bool:
    safe = method == "GET" or "Idempotency-Key" in headers
    return safe and response.status_code in _RETRY_STATUSES


def job_from_submit(data: dict[str, Any]) -> Job:
    return Job.model_validate(data)


def decode_event(name: str, data: dict[str, Any]) -> Event | None:
    if name in ("job", "done"):
        job = Job.model_validate(data)
        return JobEvent(job=job) if name == "job" else DoneEvent(job=job)
    if name == "progress":
        return ProgressEvent.model_validate(data)
    if name == "preview":
        return PreviewEvent.model_validate(data)
    if name == "error":
        raise Unavailable(503, str(data.get("code", "stream_error")), str(data.get("message")),
                          None, None)  # fmt: skip
    return None


class SSEParser:
    """Incremental Server-Sent Events parser: feed lines, get (event, data) at blank lines."""

    def __init__(self) -> None:
        self.name: str = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        if not line:
            if not self.data:
                return None
            out = (self.name, json.loads("\n".join(self.data)))
            self.name, self.data = "message", []
            return out
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self.name = value
        elif field == "data":
            self.data.append(value)
        return None


def submit_body(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}
