"""The native job routes: ``POST /v1/jobs`` (with ``Prefer: wait``), ``GET /v1/jobs``, one
job, its images, its event stream, and ``DELETE`` (cancel).

A caller sees only its own jobs: another owner's job is answered exactly like an unknown one.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from service import job_index
from service.api_deps import (
    ERROR_RESPONSES,
    JobIdDep,
    MaxPriorityDep,
    OwnerDep,
    QueueDep,
    SettingsDep,
    image_body_limit,
)
from service.api_errors import ApiError
from service.job_wait import wait_for_job
from service.queue import ApiQueue, JobRecord
from service.schemas import (
    CONTENT_TYPES,
    TERMINAL_STATUSES,
    JobList,
    JobRequest,
    JobStatus,
    JobView,
    Links,
    SubmitResponse,
)
from service.settings import Settings
from service.sse import job_events
from service.submission import submit

# The per-request log lines keep the API's one logger (service.submission writes there too).
log = logging.getLogger("service.api")


router = APIRouter()


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


_PREFER_WAIT = re.compile(r"(?:^|[,\s])wait\s*=\s*\"?(\d{1,9})\"?\s*(?:[;,]|$)", re.IGNORECASE)


def prefer_wait_s(prefer: str | None, settings: Settings) -> float:
    """Seconds asked for by ``Prefer: wait=N`` (RFC 7240), bounded by a setting; 0 = none.
    Other or malformed preferences are ignored, as the RFC asks."""
    match = _PREFER_WAIT.search(prefer or "")
    return min(float(match.group(1)), settings.max_prefer_wait_s) if match else 0.0


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=SubmitResponse,
    responses={
        **ERROR_RESPONSES,
        200: {"model": JobView, "description": "Finished within `wait`."},
    },
)
async def submit_job(
    body: JobRequest,
    response: Response,
    queue: QueueDep,
    settings: SettingsDep,
    owner: OwnerDep,
    max_priority: MaxPriorityDep,
    _: Annotated[None, Depends(image_body_limit)],
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
    prefer: Annotated[str | None, Header(max_length=1024)] = None,
) -> SubmitResponse | JSONResponse:
    """Queue a generation job; answers at once with its id (poll or stream it).

    With ``Prefer: wait=N`` the answer waits up to N seconds (at most
    ``LDMSERVE_MAX_PREFER_WAIT_S``): 200 with the finished job if it ended by then."""
    result = await submit(
        body, queue=queue, settings=settings, owner=owner, idempotency_key=idempotency_key,
        max_priority=max_priority,
    )  # fmt: skip
    base = f"/v1/jobs/{result.job_id}"
    headers = {"Location": base}
    if not result.created:
        headers["Idempotent-Replayed"] = "true"
    response.headers.update(headers)
    wait_s = prefer_wait_s(prefer, settings)
    if wait_s > 0:
        record = await wait_for_job(queue, result.job_id, wait_s, settings.sse_poll_s)
        if record is not None and record.status in TERMINAL_STATUSES:
            view = JobView.from_record(record).model_dump(mode="json")
            return JSONResponse(view, status_code=200, headers=headers)
    return SubmitResponse(
        id=result.job_id,
        status=result.status,  # type: ignore[arg-type]
        queue_position=result.queue_position,
        seed=int(result.params["seed"]),
        links=Links(self=base, events=f"{base}/events"),
    )


@router.get("/v1/jobs", response_model=JobList, responses=ERROR_RESPONSES)
async def list_jobs(
    queue: QueueDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,19}$")] = None,
    status: JobStatus | None = None,
) -> JobList:
    """The caller's own jobs, newest first; ``next_cursor`` fetches the next page."""
    found = await job_index.page(queue, owner, limit=limit, cursor=cursor, status=status)
    return JobList(
        jobs=[JobView.from_record(r) for r in found.records], next_cursor=found.next_cursor
    )


async def _record(queue: ApiQueue, job_id: str, owner: str) -> JobRecord:
    """The caller's job; another owner's job is answered exactly like an unknown one."""
    record = await queue.get(job_id)
    if record is None or record.owner != owner:
        raise ApiError(404, "job_not_found", "job not found (unknown or expired)")
    return record


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses=ERROR_RESPONSES)
async def get_job(job_id: JobIdDep, queue: QueueDep, owner: OwnerDep) -> JobView:
    """Status, queue position, progress, timestamps, error, parameters and image links."""
    started = time.perf_counter()
    record = await _record(queue, job_id, owner)
    log.info("get job=%s status=%s in %.1f ms", job_id, record.status, _ms(started))
    return JobView.from_record(record)


@router.get(
    "/v1/jobs/{job_id}/images/{index}",
    response_class=Response,
    responses={**ERROR_RESPONSES, 200: {"content": {t: {} for t in CONTENT_TYPES.values()}}},
)
async def get_image(
    job_id: JobIdDep,
    index: Annotated[int, Path(ge=0, le=1_000_000)],
    queue: QueueDep,
    owner: OwnerDep,
) -> Response:
    """One encoded image: 409 until the job succeeded, 410 once its result expired."""
    started = time.perf_counter()
    record = await _record(queue, job_id, owner)
    if record.status in ("queued", "running"):
        raise ApiError(409, "not_ready", f"job is {record.status}; no images yet")
    if record.status != "succeeded":
        raise ApiError(409, "no_images", f"job {record.status}; it has no images")
    if index >= record.image_count:
        raise ApiError(404, "image_not_found", f"job has {record.image_count} image(s)", "index")
    url = await queue.image_url(job_id, index)
    if url is not None:  # result_redirect with an s3:// store
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    data = await queue.image(job_id, index)
    if data is None:
        raise ApiError(410, "expired", "the job's images expired")
    fmt = record.format or "png"
    log.info("image job=%s index=%d bytes=%d in %.1f ms", job_id, index, len(data), _ms(started))
    max_age = max(0, int((record.expires_at or time.time()) - time.time()))
    return Response(
        data,
        media_type=CONTENT_TYPES.get(fmt, "application/octet-stream"),
        headers={
            "Cache-Control": f"private, max-age={max_age}, immutable",
            "Content-Disposition": f'inline; filename="{job_id}-{index}.{fmt}"',
        },
    )


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def job_event_stream(
    job_id: JobIdDep, queue: QueueDep, settings: SettingsDep, owner: OwnerDep
) -> StreamingResponse:
    """Server-Sent Events: the job, its progress, then its final state (see service.sse)."""
    await _record(queue, job_id, owner)
    log.info("events job=%s stream opened", job_id)
    return StreamingResponse(
        job_events(queue, job_id, settings.sse_poll_s, settings.sse_keepalive_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.delete("/v1/jobs/{job_id}", response_model=JobView, responses=ERROR_RESPONSES)
async def cancel_job(job_id: JobIdDep, queue: QueueDep, owner: OwnerDep) -> JobView:
    """Cancel: a queued job leaves the queue; a running one stops before its next step."""
    started = time.perf_counter()
    outcome = await queue.cancel(job_id, owner)
    log.info("cancel job=%s outcome=%s in %.1f ms", job_id, outcome, _ms(started))
    if outcome == "missing":
        raise ApiError(404, "job_not_found", "job not found (unknown or expired)")
    if outcome != "canceled":
        raise ApiError(409, "already_finished", f"job already {outcome}")
    return JobView.from_record(await _record(queue, job_id, owner))
