"""The one native submit path, shared by ``POST /v1/jobs`` and the compatible APIs.

Every route that creates a job goes through :func:`submit`, so the OpenAI and A1111
adapters get exactly the native checks, limits, idempotency and queue: they only translate
field names into a native request (:func:`native_request`) and answers back out.
Refusals are :class:`service.api_errors.ApiError` with native codes; adapters re-shape them.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from service.api_checks import (
    check_against_model,
    check_limits,
    check_priority,
    check_webhook,
    png_bytes,
    priority_allowed,
    read_inputs,
    resolve_model,
)
from service.api_errors import ApiError
from service.contract import IMAGE_FIELDS, MAX_SEED
from service.queue import (
    ApiQueue,
    IdempotencyMismatch,
    OwnerQueueFull,
    QueueFull,
    RateLimited,
    SubmitResult,
)
from service.ratelimit import retry_after_s
from service.schemas import JobRequest
from service.settings import Settings

# The submit line is one of the API's per-request log lines: one logger for all of them.
log = logging.getLogger("service.api")


def native_request(fields: Mapping[str, Any]) -> JobRequest:
    """A native job request from native field names; a bad value is a 422 naming the field.

    Adapters build their requests here, so a change of the native contract (new fields
    such as ``image``, ``mask``, ``strength``) reaches them in one place.
    """
    try:
        return JobRequest.model_validate(dict(fields))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        raise ApiError(422, "validation_error", message, field) from None


async def submit(
    body: JobRequest,
    *,
    queue: ApiQueue,
    settings: Settings,
    owner: str,
    idempotency_key: str | None = None,
    max_priority: str = "normal",
) -> SubmitResult:
    """Check and queue one job for ``owner``; raises ApiError (413, 422, 429) on refusal.

    Everything knowable at submit is checked here — the deployment's limits, the input
    images, and what the target model's workers published they can run — so a 202 never
    becomes a failure that could have been a 422."""
    started = time.perf_counter()
    if "priority" not in body.model_fields_set and not priority_allowed(
        body.priority, max_priority
    ):
        body = body.model_copy(update={"priority": max_priority})  # a key held below normal
    check_limits(body, settings)
    check_priority(body, max_priority)
    model = await resolve_model(body, settings, queue)
    has_inputs = body.image is not None or body.mask is not None
    images = await run_in_threadpool(read_inputs, body, settings) if has_inputs else {}
    width, height = check_against_model(body, await queue.capabilities(model), images, settings)
    webhook_url = await check_webhook(body.webhook_url, settings)
    digest = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    params = body.model_dump(exclude={"webhook_url", *IMAGE_FIELDS}) | {
        "seed": seed, "model": model, "width": width, "height": height,
    }  # fmt: skip
    inputs = {name: await run_in_threadpool(png_bytes, im) for name, im in images.items()}
    if inputs:
        params["inputs"] = sorted(inputs)
    try:
        result = await queue.submit(
            params, model=model, job_id=new_job_id(), idempotency_key=idempotency_key,
            digest=digest, owner=owner, webhook_url=webhook_url, inputs=inputs,
        )  # fmt: skip
    except RateLimited as exc:
        retry = str(retry_after_s(exc.retry_after_ms))
        log.info("submit refused: owner=%s rate limited (retry in %s s)", owner, retry)
        message = f"rate limit of {settings.rate_limit_per_min:g} submits per minute exceeded"
        raise ApiError(429, "rate_limited", message, headers={"Retry-After": retry}) from exc
    except OwnerQueueFull as exc:
        retry = str(settings.queue_full_retry_after_s)
        log.info("submit refused: owner=%s holds too many unfinished jobs", owner)
        raise ApiError(429, "too_many_jobs", str(exc), headers={"Retry-After": retry}) from exc
    except QueueFull as exc:
        retry = str(settings.queue_full_retry_after_s)
        raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": retry}) from exc
    except IdempotencyMismatch as exc:
        raise ApiError(422, "idempotency_key_reused", str(exc), "Idempotency-Key") from exc
    prompt = f" prompt={body.prompt!r}" if settings.log_prompts else ""
    log.info("submit job=%s owner=%s model=%s created=%s position=%s webhook=%s%s in %.1f ms",
             result.job_id, owner, model, result.created, result.queue_position,
             webhook_url is not None, prompt, (time.perf_counter() - started) * 1000)  # fmt: skip
    return result


def new_job_id() -> str:
    """uuid4 hex: 122 random bits from os.urandom (unguessable; ownership still checked)."""
    return uuid.uuid4().hex
