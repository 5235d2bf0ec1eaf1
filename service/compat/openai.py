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
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from service.api_errors import ApiError
from service.compat.jobs import (
    Caller,
    Outcome,
    caller,
    images_of,
    route_class,
    run_job,
    start_job,
)
from service.compat.masks import image_b64, openai_mask
from service.schemas import TERMINAL_STATUSES, JobRequest
from service.sse import job_event_stream

log = logging.getLogger(__name__)


# The SDK's own fields (current `openai` images.generate / images.edit); accepted, those
# without an ldmserve meaning ignored (quality, style, background, moderation, user, ...).
_OPENAI_FIELDS = frozenset(
    {
        "prompt", "model", "n", "size", "response_format", "output_format",
        "output_compression", "quality", "style", "background", "moderation", "user",
        "stream", "partial_images", "safety_identifier", "complexity", "frame_count",
        "frame_duration_ms", "svg", "input_fidelity", "markup",
    }
)  # fmt: skip
# Native fields set from OpenAI's instead (n, size, output_format, model).
_DERIVED = frozenset({"prompt", "num_images", "width", "height", "output_format", "model"})
# Model names OpenAI clients send by default: they mean "this server's default model".
_OPENAI_MODELS = re.compile(r"^(dall-e-[23]|gpt-image-[\w.-]+|chatgpt-image-[\w.-]+)$")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_NATIVE_TO_PARAM = {"num_images": "n", "width": "size", "height": "size"}
_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


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


def _from_native(exc: ApiError) -> OpenAIError:
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


async def _error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _invalid(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise OpenAIError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise _invalid(name, f"Invalid value: {value!r}. Supported values are: {shown}.")
    return str(value)


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(name, f"Invalid value for {name!r}: expected an integer {low}-{high}.")
    return value


def native_fields(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """OpenAI request → (native fields, response_format). Raises OpenAIError (400)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _invalid(
            "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("prompt", "Invalid value for 'prompt': expected a non-empty string.")
    native_names = set(JobRequest.model_fields) - _DERIVED
    for name in body:
        if name not in _OPENAI_FIELDS and name not in native_names:
            raise _invalid(name, f"Unknown parameter: {name!r}.", "unknown_parameter")
    fields: dict[str, Any] = {k: v for k, v in body.items() if k in native_names}
    fields["prompt"] = prompt
    n = _int(body, "n", 1, 10)
    if n is not None:
        fields["num_images"] = n
    size = body.get("size")
    if size not in (None, "auto"):
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise _invalid("size", f"Invalid value: {size!r}. Use 'WIDTHxHEIGHT' or 'auto'.")
        fields["width"], fields["height"] = int(match.group(1)), int(match.group(2))
    fields["output_format"] = _choice(body, "output_format", ("png", "jpeg", "webp"), "png")
    _int(body, "output_compression", 0, 100)  # accepted; the worker's quality is fixed
    if _int(body, "partial_images", 0, 3) and body.get("stream"):
        fields["preview"] = True  # partial images are the job's live previews
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise _invalid("model", "Invalid value for 'model': expected a string.")
        if not _OPENAI_MODELS.match(model):
            fields["model"] = model
    if not isinstance(body.get("stream", False), bool):
        raise _invalid("stream", "Invalid value for 'stream': expected a boolean.")
    response_format = _choice(body, "response_format", ("b64_json", "url"), "b64_json")
    return fields, response_format


def _size_of(outcome: Outcome) -> str:
    params = outcome.record.params if outcome.record else {}
    return f"{params.get('width')}x{params.get('height')}"


def _job_error(outcome: Outcome, wait_s: float) -> OpenAIError | None:
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


async def _data(
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


def _unavailable(retry_s: int) -> OpenAIError:
    return OpenAIError(503, "the job store is unreachable; retry shortly", type_="server_error",
                       code="service_unavailable", headers={"Retry-After": str(retry_s)})  # fmt: skip


def _redis_down(c: Caller) -> OpenAIError:
    return _unavailable(c.settings.redis_retry_after_s)


router = APIRouter(tags=["openai"], route_class=route_class(_unavailable))


@router.post("/v1/images/generations", include_in_schema=False)
async def generations(request: Request) -> Any:
    """Generate images; answers when the job ended (or streams with ``stream: true``)."""
    c = caller(request)
    body = await _json_object(request)
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
                _stream(request, c, job_id, fields["prompt"], body.get("partial_images") or 0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Ldmserve-Job": job_id},
            )
        outcome = await run_job(
            fields, queue=c.queue, settings=c.settings, owner=c.owner, idempotency_key=idem,
            max_priority=c.max_priority,
        )  # fmt: skip
    except ApiError as exc:
        raise _from_native(exc) from None
    error = _job_error(outcome, c.settings.compat_wait_s)
    if error is not None:
        raise error
    record = outcome.record
    assert record is not None
    return JSONResponse(
        {
            "created": int(record.created_at),
            "data": await _data(request, c, outcome, response_format, fields["prompt"]),
            "background": "opaque",
            "output_format": record.format or "png",
            "size": _size_of(outcome),
            "quality": "auto",
        },
        headers={"X-Ldmserve-Job": outcome.job_id},
    )


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, separators=(',', ':'))}\n\n"


def _partial_due(step: int, total: int, sent: int, wanted: int) -> bool:
    """Whether a preview at ``step`` of ``total`` becomes partial image ``sent`` of ``wanted``:
    the partials are spread over the run (thresholds at 1/(wanted+1), 2/(wanted+1), ...)."""
    return sent < wanted and step * (wanted + 1) >= (sent + 1) * total


async def _stream(
    request: Request, c: Caller, job_id: str, prompt: str, partial_images: int
) -> AsyncIterator[str]:
    """SSE: keep-alives while the job runs, up to ``partial_images``
    ``image_generation.partial_image`` events from its live previews (PNG at latent
    resolution, spread over the run; fewer when the job has fewer previews, as OpenAI allows),
    then one ``image_generation.completed`` per image."""
    s = c.settings
    deadline = time.monotonic() + s.compat_wait_s
    record, sent = None, 0
    events = job_event_stream(c.queue, job_id, s.sse_poll_s, s.sse_keepalive_s)
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                if event is None:
                    yield ": keepalive\n\n"
                elif event[0] == "preview" and _partial_due(
                    event[1]["step"], event[1]["total"], sent, partial_images
                ):
                    yield _event(
                        "image_generation.partial_image",
                        {
                            "b64_json": event[1]["image"],
                            "created_at": int(time.time()),
                            "size": f"{event[1]['width']}x{event[1]['height']}",
                            "quality": "auto",
                            "background": "opaque",
                            "output_format": "png",
                            "partial_image_index": sent,
                        },
                    )
                    sent += 1
                elif event[0] in ("done", "error"):
                    break
                if time.monotonic() > deadline:
                    break
        record = await c.queue.get(job_id)
        outcome = Outcome(job_id, record)
        error = _job_error(outcome, s.compat_wait_s)
        if error is not None:
            yield _event("error", error.body())
            return
        assert record is not None
        images = await images_of(c.queue, record) or []
        for i, data in enumerate(images):
            yield _event(
                "image_generation.completed",
                {
                    "b64_json": base64.b64encode(data).decode(),
                    "created_at": int(time.time()),
                    "size": _size_of(outcome),
                    "quality": "auto",
                    "background": "opaque",
                    "output_format": record.format or "png",
                    "image_index": i,
                    "usage": _USAGE,
                },
            )
    except (RedisConnectionError, RedisTimeoutError):
        yield _event("error", _redis_down(c).body())
    finally:
        log.info("openai stream job=%s ended (%s)", job_id, record.status if record else "?")


_INT_FORM_FIELDS = frozenset({"n", "output_compression", "partial_images"})


async def _form(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """A multipart edit request → (typed fields, uploaded files by field name).

    Form values are text: OpenAI's integer and boolean fields are parsed as such, native
    extras as JSON when they parse ("20" → 20, "0.6" → 0.6), else kept as text."""
    try:
        form = await request.form()
    except (StarletteHTTPException, MultiPartException) as exc:  # a malformed body
        detail = getattr(exc, "detail", None) or getattr(exc, "message", "")
        raise OpenAIError(400, f"could not parse the multipart body: {detail}",
                          code="invalid_multipart") from None  # fmt: skip
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    for name, value in form.multi_items():
        if not isinstance(value, str):
            files.setdefault(name, []).append(await value.read())
            continue
        if name in _INT_FORM_FIELDS:
            try:
                fields[name] = int(value)
            except ValueError:
                raise _invalid(name, f"Invalid value for {name!r}: expected an integer.") from None
        elif name == "stream":
            fields[name] = value.lower() == "true"
        elif name in _OPENAI_FIELDS:
            fields[name] = value
        else:
            try:
                fields[name] = json.loads(value)
            except ValueError:
                fields[name] = value
    return fields, files


@router.post("/v1/images/edits", include_in_schema=False)
async def edits(request: Request) -> Any:
    """Edit (img2img) or inpaint one image: multipart ``image`` (or ``image[]``), optional
    ``mask`` (transparent = repaint), ``prompt``; answers like generations."""
    c = caller(request)
    body, files = await _form(request)
    uploads = files.get("image", []) + files.get("image[]", [])
    if not uploads:
        raise _invalid(
            "image", "Missing required parameter: 'image'.", "missing_required_parameter"
        )
    if len(uploads) > 1:
        raise _invalid("image", "only one input image is supported here")
    fields, response_format = native_fields(body)
    try:
        image, size = await run_in_threadpool(image_b64, uploads[0], "image", c.settings)
        fields["image"] = image
        if files.get("mask"):
            fields["mask"] = await run_in_threadpool(
                openai_mask, files["mask"][0], c.settings, size
            )
    except ApiError as exc:
        raise _from_native(exc) from None
    return await _answer(request, c, body, fields, response_format)


def install(app: FastAPI) -> None:
    """Add the routes and their error shape to the app."""
    app.add_exception_handler(OpenAIError, _error_handler)
    app.include_router(router)
