"""The HTTP API: ``create_app(settings)`` builds the FastAPI app; the lifespan owns Redis.

This process imports neither torch nor ``model`` (checked by a test): it only talks to
Redis, so it starts fast and runs without a GPU. Routes are documented in
docs/ARCHITECTURE.md; request validation rules in :mod:`service.schemas`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from service import job_index, openapi_limits, playground
from service.api_errors import (
    BODY_BYTES_SCOPE_KEY,
    ApiError,
    BodyLimitMiddleware,
    install_error_handlers,
)
from service.auth import (
    ANONYMOUS,
    MAX_PRIORITY_SCOPE_KEY,
    OWNER_SCOPE_KEY,
    AuthMiddleware,
    KeyRing,
    is_loopback_host,
    metrics_readers,
)
from service.compat import a1111 as a1111_compat
from service.compat import openai as openai_compat
from service.contract import DEFAULT_SAMPLER, IMAGE_FIELDS, SAMPLER_NAMES
from service.job_wait import wait_for_job
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.metrics import render as render_metrics
from service.metrics import snapshot as metrics_snapshot
from service.queue import ApiQueue, JobRecord
from service.schemas import (
    CONTENT_TYPES,
    TERMINAL_STATUSES,
    ErrorResponse,
    JobList,
    JobRequest,
    JobStatus,
    JobView,
    Links,
    LoraInfo,
    LoraList,
    ModelInfo,
    ModelList,
    SamplerList,
    SubmitResponse,
)
from service.settings import Settings
from service.sse import job_events
from service.submission import new_job_id as new_job_id  # re-exported (tests, old callers)
from service.submission import submit

log = logging.getLogger(__name__)
_JOB_ID = re.compile(r"[0-9a-f]{32}")
_ERRORS: dict[int | str, dict[str, Any]] = {
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


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


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


router = APIRouter()


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
    responses={**_ERRORS, 200: {"model": JobView, "description": "Finished within `wait`."}},
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


@router.get("/v1/jobs", response_model=JobList, responses=_ERRORS)
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


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS)
async def get_job(job_id: JobIdDep, queue: QueueDep, owner: OwnerDep) -> JobView:
    """Status, queue position, progress, timestamps, error, parameters and image links."""
    started = time.perf_counter()
    record = await _record(queue, job_id, owner)
    log.info("get job=%s status=%s in %.1f ms", job_id, record.status, _ms(started))
    return JobView.from_record(record)


@router.get(
    "/v1/jobs/{job_id}/images/{index}",
    response_class=Response,
    responses={**_ERRORS, 200: {"content": {t: {} for t in CONTENT_TYPES.values()}}},
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
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
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


@router.delete("/v1/jobs/{job_id}", response_model=JobView, responses=_ERRORS)
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


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(queue: QueueDep, settings: SettingsDep) -> ModelList:
    """The default model and every model a live worker serves."""
    workers = await queue.live_workers()
    names = sorted({settings.model, *(w.model for w in workers)})
    models = []
    for name in names:
        serving = [w for w in workers if w.model == name]
        models.append(
            ModelInfo(
                id=name,
                default=name == settings.model,
                workers=len(serving),
                max_batch=sum(w.max_batch for w in serving),
                devices=sorted({w.device for w in serving}),
                queued=await queue.queue_depth(name),
                capabilities=await queue.capabilities(name),
            )
        )
    return ModelList(models=models)


@router.get("/v1/loras", response_model=LoraList, responses=_ERRORS)
async def list_loras(queue: QueueDep, settings: SettingsDep) -> LoraList:
    """The LoRA adapters (`loras[].name`) the served models' workers last published."""
    names = sorted({settings.model, *(w.model for w in await queue.live_workers())})
    models: dict[str, list[str]] = {}
    for model in names:
        caps = await queue.capabilities(model) or {}
        for lora in caps.get("loras", []):
            models.setdefault(lora, []).append(model)
    return LoraList(loras=[LoraInfo(name=n, models=m) for n, m in sorted(models.items())])


@router.get("/v1/samplers", response_model=SamplerList)
async def list_samplers() -> SamplerList:
    """Sampler names accepted in ``sampler``."""
    return SamplerList(samplers=list(SAMPLER_NAMES), default=DEFAULT_SAMPLER)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (no dependency checked: for liveness probes)."""
    return {"status": "ok"}


@router.get("/readyz", responses=_ERRORS)
async def readyz(queue: QueueDep, settings: SettingsDep) -> dict[str, Any]:
    """Ready when Redis answers and at least one worker heart-beats."""
    await queue.ping()
    workers = await queue.live_workers()
    if not workers:
        retry = {"Retry-After": str(settings.redis_retry_after_s)}
        raise ApiError(503, "no_workers", "no live worker is connected", headers=retry)
    return {"status": "ready", "workers": len(workers)}


@router.get("/metrics", response_class=Response)
async def metrics(queue: QueueDep) -> Response:
    """Prometheus text format."""
    return Response(render_metrics(await metrics_snapshot(queue)), media_type=METRICS_CONTENT_TYPE)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; Redis is connected lazily, so the app starts even while it is down."""
    settings = settings or Settings()
    keys = KeyRing.from_settings(settings.api_keys, settings.api_keys_file)
    if not keys.enabled and not is_loopback_host(settings.host):
        log.warning("auth is OFF (no LDMSERVE_API_KEYS) while binding %s: anyone who can "
                    "reach this port can submit and read every job", settings.host)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue = ApiQueue.connect(settings)
        app.state.queue = queue
        dispatch: asyncio.Task[None] | None = None
        if settings.webhook_secret is not None:
            from service.webhook_dispatch import WebhookDispatcher  # httpx: only when needed

            app.state.webhooks = WebhookDispatcher(queue.store)
            dispatch = asyncio.create_task(app.state.webhooks.run())
        try:
            yield
        finally:
            if dispatch is not None:
                app.state.webhooks.stop()
                done, _ = await asyncio.wait({dispatch}, timeout=settings.webhook_timeout_s + 2)
                if not done:
                    dispatch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await dispatch
            await queue.aclose()

    app = FastAPI(
        title="ldmserve",
        version="0.1.0",
        description="Asynchronous Stable Diffusion jobs with step-level continuous batching.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app, settings.redis_retry_after_s)
    app.include_router(router)
    openai_compat.install(app)
    a1111_compat.install(app)
    playground.install(app)
    openapi_limits.install(app, settings)
    # Middleware added last runs first: CORS (preflights need no key), then auth (a bad key
    # is refused before the body is read or validated), then the body limit.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        larger={
            ("POST", path): settings.max_image_body_bytes
            for path in ("/v1/jobs", "/v1/images/edits", "/sdapi/v1/img2img")
        },
    )
    app.add_middleware(
        AuthMiddleware,
        keys=keys,
        metrics_public=settings.metrics_public,
        metrics_readers=metrics_readers(keys, settings.metrics_keys),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "Idempotency-Key", "Authorization"],
            expose_headers=["Location", "Retry-After"],
        )
    return app
