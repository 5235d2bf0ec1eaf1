"""What the native routes share: request dependencies (settings, queue, the caller's key
name and priority cap, job id, the image body limit) and the documented error responses.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from service.api_errors import BODY_BYTES_SCOPE_KEY, ApiError
from service.auth import ANONYMOUS, MAX_PRIORITY_SCOPE_KEY, OWNER_SCOPE_KEY
from service.contract import IMAGE_FIELDS
from service.queue import ApiQueue
from service.schemas import ErrorResponse
from service.settings import Settings

_JOB_ID = re.compile(r"[0-9a-f]{32}")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 409, 410, 413, 422, 429, 503)
}


# Dependencies are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in its
# thread pool, a thread hop per dependency per request for what are attribute reads.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_queue(request: Request) -> ApiQueue:
    return request.app.state.queue


async def get_owner(request: Request) -> str:
    """The caller's key name (set by AuthMiddleware); ``anonymous`` while auth is off."""
    return str(request.scope.get(OWNER_SCOPE_KEY, ANONYMOUS))


SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[ApiQueue, Depends(get_queue)]
OwnerDep = Annotated[str, Depends(get_owner)]


async def get_max_priority(request: Request) -> str:
    """The highest job priority the caller's key may use (set by AuthMiddleware)."""
    return str(request.scope.get(MAX_PRIORITY_SCOPE_KEY, "normal"))


MaxPriorityDep = Annotated[str, Depends(get_max_priority)]


async def job_id_param(job_id: Annotated[str, Path(max_length=64)]) -> str:
    """Ids are uuid4 hex; anything else cannot exist (404, not 422)."""
    if not _JOB_ID.fullmatch(job_id):
        raise ApiError(404, "job_not_found", "job not found")
    return job_id


JobIdDep = Annotated[str, Depends(job_id_param)]


async def image_body_limit(request: Request, settings: SettingsDep) -> None:
    """Only a body carrying image or mask may use the larger image body limit (413 else).

    A dependency, so it answers before the body's validation errors would."""
    size = request.scope.get(BODY_BYTES_SCOPE_KEY)
    if size is None or size <= settings.max_body_bytes:
        return
    try:
        data = json.loads(await request.body())
    except ValueError:
        data = None
    if not isinstance(data, dict) or all(data.get(name) is None for name in IMAGE_FIELDS):
        message = f"request body exceeds {settings.max_body_bytes} bytes (without image or mask)"
        raise ApiError(413, "payload_too_large", message)
