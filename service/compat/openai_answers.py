"""OpenAI Images answers for a job that was queued: its images (``b64_json`` or ``url``),
its size, and why it gave none (errors that the SDK must not retry).
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import Request

from service.compat.jobs import (
    Caller,
    Outcome,
    images_of,
)
from service.compat.openai_errors import (
    OpenAIError,
)
from service.schemas import TERMINAL_STATUSES


def size_of(outcome: Outcome) -> str:
    params = outcome.record.params if outcome.record else {}
    return f"{params.get('width')}x{params.get('height')}"


def job_error(outcome: Outcome, wait_s: float) -> OpenAIError | None:
    """Why a queued job gives no images (None: it succeeded); never retried by the SDK."""
    record, job_id = outcome.record, outcome.job_id
    no_retry = {"x-should-retry": "false", "X-Ldmserve-Job": job_id}
    if record is None:
        return OpenAIError(500, f"job {job_id} expired", type_="server_error",
                           code="job_expired", headers=no_retry)  # fmt: skip
    if record.status not in TERMINAL_STATUSES:
        message = (
            f"job {job_id} did not finish within {wait_s:g} s; it is still {record.status}: "
            f"fetch it from /v1/jobs/{job_id}"
        )
        return OpenAIError(504, message, type_="server_error", code="timeout", headers=no_retry)
    if record.status == "failed":
        message = f"job {job_id} failed: {record.error or record.error_code}"
        return OpenAIError(500, message, type_="server_error",
                           code=record.error_code or "generation_failed", headers=no_retry)  # fmt: skip
    if record.status == "canceled":
        return OpenAIError(409, f"job {job_id} was canceled", code="job_canceled",
                           headers=no_retry)  # fmt: skip
    return None


def _image_url(request: Request, job_id: str, index: int) -> str:
    return f"{str(request.base_url).rstrip('/')}/v1/jobs/{job_id}/images/{index}"


async def image_data(
    request: Request, c: Caller, outcome: Outcome, response_format: str, prompt: str
) -> list[dict[str, Any]]:
    record = outcome.record
    assert record is not None
    if response_format == "url":
        return [
            {"url": _image_url(request, record.id, i), "revised_prompt": prompt}
            for i in range(record.image_count)
        ]
    images = await images_of(c.queue, record)
    if images is None:
        raise OpenAIError(500, f"job {record.id}: images expired", type_="server_error",
                          code="job_expired", headers={"x-should-retry": "false"})  # fmt: skip
    return [{"b64_json": base64.b64encode(b).decode(), "revised_prompt": prompt} for b in images]
