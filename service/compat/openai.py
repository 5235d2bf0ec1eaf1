"""OpenAI Images API: ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (img2img,
or inpainting with a mask whose transparent pixels mark the area to repaint).

Fields are the ones the ``openai`` SDK sends; ldmserve's own (negative_prompt, steps,
guidance_scale, sampler, seed, ...) ride along as top-level extras, which is what the SDK
sends for ``extra_body``. The call is synchronous: the job goes through the native queue
and the answer comes once it ended, or after ``compat_wait_s`` as an error naming the job
id. Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; errors
after a job was queued carry ``x-should-retry: false`` so the SDK's automatic retries do
not queue the same prompt again. ``stream: true`` answers SSE; ``partial_images`` (1-3) asks
the job for live previews, sent as ``image_generation.partial_image`` events.

This module holds the routes and :func:`install`; the translation of OpenAI bodies to native
fields is :mod:`service.compat.openai_requests`, the JSON answers
:mod:`service.compat.openai_answers`, the SSE answer :mod:`service.compat.openai_stream`
and the error shape :mod:`service.compat.openai_errors`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from service.api_errors import ApiError
from service.compat.jobs import (
    Caller,
    caller,
    route_class,
    run_job,
    start_job,
)
from service.compat.masks import image_b64, openai_mask
from service.compat.openai_answers import image_data, job_error, size_of
from service.compat.openai_errors import (
    OpenAIError,
    error_handler,
    from_native,
    invalid,
    unavailable,
)
from service.compat.openai_requests import json_object, native_fields, read_form
from service.compat.openai_stream import stream_job

router = APIRouter(tags=["openai"], route_class=route_class(unavailable))


@router.post("/v1/images/generations", include_in_schema=False)
async def generations(request: Request) -> Any:
    """Generate images; answers when the job ended (or streams with ``stream: true``)."""
    c = caller(request)
    body = await json_object(request)
    fields, response_format = native_fields(body)
    return await _answer(request, c, body, fields, response_format)


async def _answer(
    request: Request,
    c: Caller,
    body: dict[str, Any],
    fields: dict[str, Any],
    response_format: str,
) -> Any:
    """Run the job through the native path and answer (JSON, or SSE when streaming)."""
    idem = request.headers.get("idempotency-key")
    try:
        if body.get("stream"):
            job_id = await start_job(
                fields, queue=c.queue, settings=c.settings, owner=c.owner, idempotency_key=idem,
                max_priority=c.max_priority,
            )  # fmt: skip
            return StreamingResponse(
                stream_job(request, c, job_id, fields["prompt"], body.get("partial_images") or 0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Ldmserve-Job": job_id},
            )
        outcome = await run_job(
            fields, queue=c.queue, settings=c.settings, owner=c.owner, idempotency_key=idem,
            max_priority=c.max_priority,
        )  # fmt: skip
    except ApiError as exc:
        raise from_native(exc) from None
    error = job_error(outcome, c.settings.compat_wait_s)
    if error is not None:
        raise error
    record = outcome.record
    assert record is not None
    return JSONResponse(
        {
            "created": int(record.created_at),
            "data": await image_data(request, c, outcome, response_format, fields["prompt"]),
            "background": "opaque",
            "output_format": record.format or "png",
            "size": size_of(outcome),
            "quality": "auto",
        },
        headers={"X-Ldmserve-Job": outcome.job_id},
    )


@router.post("/v1/images/edits", include_in_schema=False)
async def edits(request: Request) -> Any:
    """Edit (img2img) or inpaint one image: multipart ``image`` (or ``image[]``), optional
    ``mask`` (transparent = repaint), ``prompt``; answers like generations."""
    c = caller(request)
    body, files = await read_form(request)
    uploads = files.get("image", []) + files.get("image[]", [])
    if not uploads:
        raise invalid("image", "Missing required parameter: 'image'.", "missing_required_parameter")
    if len(uploads) > 1:
        raise invalid("image", "only one input image is supported here")
    fields, response_format = native_fields(body)
    try:
        image, size = await run_in_threadpool(image_b64, uploads[0], "image", c.settings)
        fields["image"] = image
        if files.get("mask"):
            fields["mask"] = await run_in_threadpool(
                openai_mask, files["mask"][0], c.settings, size
            )
    except ApiError as exc:
        raise from_native(exc) from None
    return await _answer(request, c, body, fields, response_format)


def install(app: FastAPI) -> None:
    """Add the routes and their error shape to the app."""
    app.add_exception_handler(OpenAIError, error_handler)
    app.include_router(router)
