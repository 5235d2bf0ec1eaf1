"""AUTOMATIC1111 web UI API (``/sdapi/v1/*``) over the native submit/wait path: the routes.

``txt2img`` and ``img2img`` (init image, mask, denoising strength) take A1111's field names and
defaults and answer A1111's ``{images: [raw base64], parameters, info}`` (``info`` a JSON string). Fields ldmserve does
not act on (hires fix, face restore, scripts, null values, unknown names) are accepted and
listed in ``info["ldmserve_ignored_fields"]``. Samplers and schedule types map to native
samplers by table; a combination without a native equivalent is a 422, never a substitute.
``progress``, ``interrupt`` and ``skip`` act on the caller's own jobs only (per API key);
their jobs ask for live previews, which ``progress`` shows as ``current_image``.

This module holds the routes and :func:`install`; the translation of A1111 bodies to native
fields is :mod:`service.compat.a1111_requests`, the sampler tables
:mod:`service.compat.a1111_samplers`, the ``info`` answer :mod:`service.compat.a1111_info`
and the error shape :mod:`service.compat.a1111_errors`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from service import job_index
from service.api_errors import ApiError
from service.compat.a1111_errors import A1111Error, error_handler, from_native, unavailable
from service.compat.a1111_info import info_json
from service.compat.a1111_requests import (
    IMG2IMG_DEFAULTS,
    TXT2IMG_DEFAULTS,
    default_model,
    img2img_fields,
    model_name,
    read_body,
    txt2img_fields,
)
from service.compat.a1111_samplers import SAMPLERS, SCHEDULERS
from service.compat.jobs import Caller, caller, images_of, route_class, run_job

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], route_class=route_class(unavailable))


async def _served(c: Caller) -> list[str]:
    workers = await c.queue.live_workers()
    return sorted({c.settings.model, *(w.model for w in workers)})


@router.post("/txt2img", include_in_schema=False)
async def txt2img(request: Request) -> JSONResponse:
    """Text to image; answers once the job ended (A1111 is synchronous)."""
    c = caller(request)
    body = await read_body(request)
    try:
        fields, ignored = await txt2img_fields(c, body)
    except ApiError as exc:
        raise from_native(exc) from None
    return await _generate(c, body, fields, ignored, TXT2IMG_DEFAULTS)


@router.post("/img2img", include_in_schema=False)
async def img2img(request: Request) -> JSONResponse:
    """Image to image, or inpainting with ``mask`` (white = repaint)."""
    c = caller(request)
    body = await read_body(request)
    try:
        fields, ignored = await img2img_fields(c, body)
    except ApiError as exc:
        raise from_native(exc) from None
    return await _generate(c, body, fields, ignored, IMG2IMG_DEFAULTS)


async def _generate(
    c: Caller,
    body: dict[str, Any],
    fields: dict[str, Any],
    ignored: list[str],
    defaults: Mapping[str, Any],
) -> JSONResponse:
    """Run the native job and answer A1111's ``{images, parameters, info}``."""
    try:
        outcome = await run_job(
            fields, queue=c.queue, settings=c.settings, owner=c.owner, max_priority=c.max_priority
        )
    except ApiError as exc:
        raise from_native(exc) from None
    record, job_id = outcome.record, outcome.job_id
    headers = {"X-Ldmserve-Job": job_id}
    if record is None:
        raise A1111Error(500, "job_expired", f"job {job_id} expired", headers)
    if not outcome.finished:
        raise A1111Error(504, "timeout", f"job {job_id} did not finish within "
                         f"{c.settings.compat_wait_s:g} s; it is still {record.status}: "
                         f"fetch it from /v1/jobs/{job_id}", headers)  # fmt: skip
    if record.status == "failed":
        raise A1111Error(500, record.error_code or "generation_failed",
                         f"job {job_id} failed: {record.error}", headers)  # fmt: skip
    images: list[bytes] = []
    if record.status == "succeeded":
        images = await images_of(c.queue, record) or []
    send = body.get("send_images", True) is not False
    parameters = {**defaults, **body}
    info = info_json(record.params, fields, job_id, ignored, len(images),
                 record.status == "canceled")  # fmt: skip
    return JSONResponse(
        {
            "images": [base64.b64encode(b).decode() for b in images] if send else [],
            "parameters": parameters,
            "info": info,
        },
        headers=headers,
    )


@router.get("/samplers", include_in_schema=False)
async def samplers() -> list[dict[str, Any]]:
    """Samplers with a native equivalent, A1111's names and aliases."""
    out = []
    for s in SAMPLERS:
        if s.listed:
            options = {"scheduler": "karras"} if s.name == "DPM++ 2M" else {}
            out.append({"name": s.name, "aliases": list(s.aliases), "options": options})
    return out


@router.get("/schedulers", include_in_schema=False)
async def schedulers() -> list[dict[str, Any]]:
    """Schedule types some sampler here supports (see ``samplers`` for which)."""
    return list(SCHEDULERS)


@router.get("/sd-models", include_in_schema=False)
async def sd_models(request: Request) -> list[dict[str, Any]]:
    """The models live workers serve (plus the default)."""
    names = await _served(caller(request))
    return [
        {"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n, "config": None}
        for n in names
    ]


@router.get("/options", include_in_schema=False)
async def get_options(request: Request) -> dict[str, Any]:
    """The options ldmserve has: the caller's model choice; fixed values for the rest."""
    c = caller(request)
    return {
        "sd_model_checkpoint": await default_model(c) or c.settings.model,
        "sd_checkpoint_hash": None,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
    }


@router.post("/options", include_in_schema=False)
async def set_options(request: Request) -> None:
    """``sd_model_checkpoint`` picks the caller's default model; other options are ignored."""
    c = caller(request)
    body = await read_body(request)
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint is None:
        return None
    name = model_name(str(checkpoint))
    served = await _served(c)
    if name not in served:
        raise A1111Error(422, "unknown_model", f"model {name!r} is not served here "
                         f"(served: {', '.join(served)})")  # fmt: skip
    key = c.queue.store.keys.owner_a1111(c.owner)
    if name == c.settings.model:
        await c.queue.store.redis.delete(key)
    else:
        await c.queue.store.redis.set(key, name)
    return None


@router.get("/progress", include_in_schema=False)
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    """The caller's current job: its progress, ETA and step; ``current_image`` is its latest
    live preview (raw base64 PNG at latent resolution), null before the first one."""
    c = caller(request)
    jobs = await job_index.active(c.queue, c.owner)
    running = sorted((j for j in jobs if j.status == "running"), key=lambda j: j.started_at or 0)
    current = running[0] if running else None
    step = (current.step or 0) if current else 0
    total = (current.total or 0) if current else 0
    preview = None
    if current is not None and not skip_current_image:
        preview = await c.queue.preview(current.id)
    return {
        "progress": step / total if total else 0.0,
        "eta_relative": (current.eta_s or 0.0) if current else 0.0,
        "state": {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": f"task({current.id})" if current else "",
            "job_count": len(jobs),
            "job_timestamp": time.strftime(
                "%Y%m%d%H%M%S", time.gmtime(current.created_at if current else 0)
            ),
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": total,
        },
        "current_image": preview["image"] if preview else None,
        "textinfo": None,
        "current_task": current.id if current else None,
    }


async def _cancel_running(c: Caller, only_current: bool) -> list[str]:
    jobs = await job_index.active(c.queue, c.owner)
    running = sorted((j for j in jobs if j.status == "running"), key=lambda j: j.started_at or 0)
    if only_current:
        running = running[:1]
    return [j.id for j in running if await c.queue.cancel(j.id, c.owner) == "canceled"]


@router.post("/interrupt", include_in_schema=False)
async def interrupt(request: Request) -> dict[str, Any]:
    """Stop every running job of the caller (queued ones stay queued, as in A1111)."""
    await _cancel_running(caller(request), only_current=False)
    return {}


@router.post("/skip", include_in_schema=False)
async def skip(request: Request) -> dict[str, Any]:
    """Stop the caller's current (oldest running) job; the next one then runs. A job is
    one request here, so skipping one image of a batch is not possible."""
    await _cancel_running(caller(request), only_current=True)
    return {}


@router.get("/scripts", include_in_schema=False)
async def scripts() -> dict[str, list[str]]:
    """No A1111 scripts or extensions here (clients probe this at start)."""
    return {"txt2img": [], "img2img": []}


def install(app: FastAPI) -> None:
    """Add the routes and their error shape to the app."""
    app.add_exception_handler(A1111Error, error_handler)
    app.include_router(router)
