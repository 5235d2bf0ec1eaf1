"""Per-request checks of a submit that depend on settings, live workers or DNS.

The fixed shape of a request is :class:`service.schemas.JobRequest`'s job; what a
deployment can change (limits), what only Redis knows (served models) and what needs a
resolver (the webhook's SSRF policy) is checked here, each failure a 422 naming the field.
"""

from __future__ import annotations

import unicodedata

from service.api_errors import ApiError
from service.queue import ApiQueue
from service.queue.keys import PRIORITIES
from service.schemas import JobRequest
from service.settings import Settings
from service.webhooks import AllowList, WebhookRefused, check_url


def _out_of_range(field: str, message: str) -> ApiError:
    return ApiError(422, "out_of_range", f"{field}: {message}", field)


def _bad_char(c: str) -> bool:
    """Control characters (C0, DEL, C1) but tab/newline, and lone surrogates (which
    JSON's \\ud800 escapes can produce and UTF-8 cannot carry)."""
    return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cs")


def check_limits(body: JobRequest, s: Settings) -> None:
    """Limits that are settings (so a deployment can change them), checked per request."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if len(text) > s.max_prompt_chars:
            raise _out_of_range(name, f"at most {s.max_prompt_chars} characters")
        if any(_bad_char(c) for c in text):
            raise ApiError(422, "invalid_text", f"{name}: control characters", name)
    if body.model is not None and any(_bad_char(c) for c in body.model):
        raise ApiError(422, "invalid_text", "model: control characters", "model")
    if not body.prompt.strip():
        raise ApiError(422, "validation_error", "prompt: must not be blank", "prompt")
    for name in ("width", "height"):
        side = getattr(body, name)
        if not s.min_side <= side <= s.max_side:
            raise _out_of_range(name, f"must be between {s.min_side} and {s.max_side}")
        if side % s.side_multiple:
            raise _out_of_range(name, f"must be a multiple of {s.side_multiple}")
    if not s.min_steps <= body.steps <= s.max_steps:
        raise _out_of_range("steps", f"must be between {s.min_steps} and {s.max_steps}")
    if not s.min_guidance <= body.guidance_scale <= s.max_guidance:
        raise _out_of_range(
            "guidance_scale", f"must be between {s.min_guidance} and {s.max_guidance}"
        )
    if not 1 <= body.num_images <= s.max_num_images:
        raise _out_of_range("num_images", f"must be between 1 and {s.max_num_images}")


def check_priority(body: JobRequest, allowed: str) -> None:
    """403 when the job asks for a higher priority than the caller's key may use."""
    if PRIORITIES.index(body.priority) < PRIORITIES.index(allowed):
        message = f"priority: this key may use {allowed!r} at most"
        raise ApiError(403, "priority_not_allowed", message, "priority")


async def resolve_model(body: JobRequest, s: Settings, queue: ApiQueue) -> str:
    """The default model, or one a live worker serves; else 422 on ``model``."""
    if body.model is None or body.model == s.model:
        return s.model
    if any(w.model == body.model for w in await queue.live_workers()):
        return body.model
    raise ApiError(422, "unknown_model", f"model: {body.model!r} is not served here", "model")


async def check_webhook(url: str | None, s: Settings) -> str | None:
    """The URL when webhooks are on and it passes the SSRF policy; else 422 on the field."""
    if url is None:
        return None
    if s.webhook_secret is None:
        message = "webhook_url: webhooks are disabled here (no LDMSERVE_WEBHOOK_SECRET)"
        raise ApiError(422, "webhooks_disabled", message, "webhook_url")
    try:
        await check_url(url, AllowList.parse(s.webhook_allow), s.webhook_timeout_s)
    except WebhookRefused as exc:
        raise ApiError(422, "webhook_refused", f"webhook_url: {exc}", "webhook_url") from None
    return url
