"""Per-request checks of a submit that depend on settings, live workers or DNS.

The fixed shape of a request is :class:`service.schemas.JobRequest`'s job; what a
deployment can change (limits), what only Redis knows (served models) and what needs a
resolver (the webhook's SSRF policy) is checked here, each failure a 422 naming the field.
"""

from __future__ import annotations

import io
import unicodedata
from typing import TYPE_CHECKING, Any

from service.api_errors import ApiError
from service.contract import ContractError, check_capabilities
from service.image_input import decode_image
from service.queue import ApiQueue
from service.queue.keys import PRIORITIES
from service.schemas import JobRequest
from service.settings import Settings
from service.webhooks import AllowList, WebhookRefused, check_url

if TYPE_CHECKING:
    from PIL import Image


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
    for name in ("width", "height"):
        side = getattr(body, name)
        if side is not None:
            check_side(name, side, s)
    if not s.min_steps <= body.steps <= s.max_steps:
        raise _out_of_range("steps", f"must be between {s.min_steps} and {s.max_steps}")
    if not s.min_guidance <= body.guidance_scale <= s.max_guidance:
        raise _out_of_range(
            "guidance_scale", f"must be between {s.min_guidance} and {s.max_guidance}"
        )
    if not 1 <= body.num_images <= s.max_num_images:
        raise _out_of_range("num_images", f"must be between 1 and {s.max_num_images}")
    if len(body.loras) > s.max_loras_per_job:
        raise _out_of_range("loras", f"at most {s.max_loras_per_job} per job")


def check_side(name: str, side: int, s: Settings) -> None:
    """A width or height within the deployment's limits (asked for, or resolved at submit)."""
    if not s.min_side <= side <= s.max_side:
        raise _out_of_range(name, f"must be between {s.min_side} and {s.max_side}")
    if side % s.side_multiple:
        raise _out_of_range(name, f"must be a multiple of {s.side_multiple}")


def read_inputs(body: JobRequest, s: Settings) -> dict[str, Image.Image]:
    """The request's image / mask, decoded and checked (413/422 naming the field)."""
    if body.mask is not None and body.image is None:
        raise ApiError(422, "validation_error", "mask: a mask needs an image to inpaint", "mask")
    images: dict[str, Image.Image] = {}
    if body.image is not None:
        images["image"] = decode_image(body.image, field="image", settings=s, mode="RGB")
    if body.mask is not None:
        images["mask"] = decode_image(body.mask, field="mask", settings=s, mode="L")
    return images


def png_bytes(image: Image.Image) -> bytes:
    """What is stored for the worker: a PNG this process wrote from the checked pixels."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def check_against_model(
    body: JobRequest, caps: dict[str, Any] | None, images: dict[str, Image.Image], s: Settings
) -> tuple[int | None, int | None]:
    """(width, height) once the model's capabilities are known; 422 naming the field if the
    model cannot run the request. Without capabilities (no worker of the model has ever
    registered) only the deployment's limits apply and the sizes stay as given."""
    image, mask = images.get("image"), images.get("mask")
    if caps is None:
        if not body.prompt.strip():  # a prompt-free model's workers say so once registered
            raise ApiError(422, "validation_error", "prompt: must not be blank", "prompt")
        return body.width, body.height
    try:
        width, height = check_capabilities(
            body, caps, image.size if image else None, mask.size if mask else None
        )
    except ContractError as exc:
        raise ApiError(422, exc.code, f"{exc.field}: {exc}", exc.field) from None
    check_side("width", width, s)
    check_side("height", height, s)
    return width, height


def priority_allowed(priority: str, allowed: str) -> bool:
    """Whether ``priority`` is at or below ``allowed`` (PRIORITIES runs highest first)."""
    return PRIORITIES.index(priority) >= PRIORITIES.index(allowed)


def check_priority(body: JobRequest, allowed: str) -> None:
    """403 when the job asks for a higher priority than the caller's key may use."""
    if not priority_allowed(body.priority, allowed):
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
