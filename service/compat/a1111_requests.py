"""A1111 request bodies → native job fields: A1111's field names and defaults, the caller's
model choice (``POST /sdapi/v1/options``), and the names of the fields not acted on.

Fields ldmserve does not act on (hires fix, face restore, scripts, null values, unknown
names) are accepted and returned as ignored, for ``info["ldmserve_ignored_fields"]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from service.compat.a1111_errors import A1111Error
from service.compat.a1111_samplers import find_sampler
from service.compat.jobs import Caller
from service.compat.masks import a1111_mask
from service.queue.records import text

CLIP_SKIP_SETTING = "CLIP_stop_at_last_layers"  # A1111's option name for clip skip
_ACTED_ON_SETTINGS = {"sd_model_checkpoint", CLIP_SKIP_SETTING}
# A1111's StableDiffusionProcessingTxt2Img API defaults for the fields acted on.
TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "seed": -1, "sampler_name": None,
    "sampler_index": "Euler", "scheduler": None, "batch_size": 1, "n_iter": 1, "steps": 50,
    "cfg_scale": 7.0, "width": 512, "height": 512, "override_settings": {},
    "send_images": True,
}  # fmt: skip
# ... and StableDiffusionProcessingImg2Img's, on top of those.
IMG2IMG_DEFAULTS: dict[str, Any] = {
    **TXT2IMG_DEFAULTS, "init_images": None, "mask": None, "denoising_strength": 0.75,
    "inpainting_mask_invert": 0, "resize_mode": 0,
}  # fmt: skip


def _number(body: dict[str, Any], name: str, *, integer: bool) -> Any:
    value = body.get(name)
    if value is None:
        return IMG2IMG_DEFAULTS[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer and float(value).is_integer():
        return int(value)
    if ok and not integer:
        return float(value)
    kind = "an integer" if integer else "a number"
    raise A1111Error(422, "validation_error", f"{name}: expected {kind}, got {value!r}")


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return str(TXT2IMG_DEFAULTS[name])
    if not isinstance(value, str):
        raise A1111Error(422, "validation_error", f"{name}: expected a string")
    return value


async def default_model(c: Caller) -> str | None:
    """The caller's ``sd_model_checkpoint`` choice (POST /options), if any."""
    return text(await c.queue.store.redis.get(c.queue.store.keys.owner_a1111(c.owner)))


async def txt2img_fields(
    c: Caller, body: dict[str, Any], known: Mapping[str, Any] = TXT2IMG_DEFAULTS
) -> tuple[dict[str, Any], list[str]]:
    """A1111 txt2img body → (native fields, ignored field names: those not in ``known``)."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise A1111Error(422, "validation_error", "override_settings: expected an object")
    sampler = body.get("sampler_name") or body.get("sampler_index") or "Euler"
    if not isinstance(sampler, str):
        raise A1111Error(422, "validation_error", "sampler_name: expected a string")
    scheduler = body.get("scheduler")
    if scheduler is not None and not isinstance(scheduler, str):
        raise A1111Error(422, "validation_error", "scheduler: expected a string")
    batch = _number(body, "batch_size", integer=True)
    n_iter = _number(body, "n_iter", integer=True)
    fields: dict[str, Any] = {
        "prompt": _text(body, "prompt"),
        "negative_prompt": _text(body, "negative_prompt"),
        "sampler": find_sampler(sampler, scheduler),
        "steps": _number(body, "steps", integer=True),
        "guidance_scale": _number(body, "cfg_scale", integer=False),
        "width": _number(body, "width", integer=True),
        "height": _number(body, "height", integer=True),
        "num_images": batch * n_iter,
        "preview": True,  # A1111 shows live previews by default: /progress's current_image
    }
    seed = _number(body, "seed", integer=True)
    if seed != -1:
        fields["seed"] = seed
    model = overrides.get("sd_model_checkpoint") or await default_model(c)
    if model:
        fields["model"] = model_name(str(model))
    clip_skip = overrides.get(CLIP_SKIP_SETTING)
    if clip_skip is not None:
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool):
            raise A1111Error(
                422,
                "validation_error",
                f"override_settings.{CLIP_SKIP_SETTING}: expected an integer",
            )
        fields["clip_skip"] = clip_skip
    ignored = sorted(k for k in body if k not in known)
    ignored += sorted(f"override_settings.{k}" for k in overrides if k not in _ACTED_ON_SETTINGS)
    return fields, ignored


def model_name(checkpoint: str) -> str:
    """A1111 titles look like ``name.safetensors [hash]``; ldmserve's are the name."""
    return checkpoint.split(" [", 1)[0].strip()


async def read_body(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise A1111Error(422, "invalid_json", "body: not valid JSON") from None
    if not isinstance(data, dict):
        raise A1111Error(422, "invalid_json", "body: expected a JSON object")
    return data


async def img2img_fields(c: Caller, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A1111 img2img body → native fields with ``image``, ``mask``, ``strength``."""
    fields, ignored = await txt2img_fields(c, body, IMG2IMG_DEFAULTS)
    images = body.get("init_images")
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        raise A1111Error(422, "validation_error", "init_images: expected a list of base64 images")
    if len(images) > 1:
        ignored.append("init_images[1:]")
    resize_mode = _number(body, "resize_mode", integer=True)
    if resize_mode != 0:
        raise A1111Error(422, "unsupported_resize_mode", f"resize_mode {resize_mode} is not "
                         "available here (only 0, just resize)")  # fmt: skip
    fields["image"] = images[0]
    fields["strength"] = _number(body, "denoising_strength", integer=False)
    mask = body.get("mask")
    if mask is not None:
        if not isinstance(mask, str):
            raise A1111Error(422, "validation_error", "mask: expected a base64 image")
        invert = _number(body, "inpainting_mask_invert", integer=True) == 1
        fields["mask"] = await run_in_threadpool(a1111_mask, mask, c.settings, invert)
    return fields, ignored
