"""AUTOMATIC1111 web UI API (``/sdapi/v1/*``) over the native submit/wait path.

``txt2img`` and ``img2img`` (init image, mask, denoising strength) take A1111's field names and
defaults and answer A1111's ``{images: [raw base64], parameters, info}`` (``info`` a JSON string). Fields ldmserve does
not act on (hires fix, face restore, scripts, null values, unknown names) are accepted and
listed in ``info["ldmserve_ignored_fields"]``. Samplers and schedule types map to native
samplers by table; a combination without a native equivalent is a 422, never a substitute.
``progress``, ``interrupt`` and ``skip`` act on the caller's own jobs only (per API key);
their jobs ask for live previews, which ``progress`` shows as ``current_image``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service import job_index
from service.api_errors import ApiError
from service.compat.jobs import Caller, caller, images_of, route_class, run_job
from service.compat.masks import a1111_mask
from service.infotext import A1111_SAMPLERS, VERSION, image_infotexts
from service.queue.records import text


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler and the native sampler for each schedule type it supports."""

    name: str
    aliases: tuple[str, ...]
    schedules: Mapping[str, str]  # A1111 scheduler name → native sampler
    listed: bool = True


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"),
            {"automatic": "euler_a", "normal": "euler_a"}),
    Sampler("Euler", ("k_euler",), {"automatic": "euler", "normal": "euler"}),
    Sampler("Heun", ("k_heun",), {"automatic": "heun", "normal": "heun"}),
    # A1111's default ("Automatic") schedule for DPM++ 2M is Karras.
    Sampler("DPM++ 2M", ("k_dpmpp_2m",),
            {"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras", "normal": "dpmpp_2m"}),
    Sampler("DPM++ 2M Karras", ("k_dpmpp_2m_ka",),  # the name before A1111 1.9
            {"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras"}, listed=False),
    Sampler("DDIM", ("ddim",), {"automatic": "ddim"}),
    Sampler("PLMS", ("plms",), {"automatic": "pndm"}),
    Sampler("LCM", ("k_lcm",), {"automatic": "lcm"}),
)  # fmt: skip
SCHEDULERS: tuple[dict[str, Any], ...] = (
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
     "need_inner_model": False},
    {"name": "normal", "label": "Normal", "aliases": None, "default_rho": -1,
     "need_inner_model": True},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
     "need_inner_model": False},
)  # fmt: skip
_SCHEDULER_NAMES = {s["name"]: s["name"] for s in SCHEDULERS} | {
    s["label"].lower(): s["name"] for s in SCHEDULERS
}
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


class A1111Error(Exception):
    """An answer in A1111's error shape ``{"error", "detail", "body", "errors"}``."""

    def __init__(
        self, status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = dict(headers or {})


async def _error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, A1111Error)
    body = {"error": exc.code, "detail": exc.detail, "body": "", "errors": exc.detail}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _from_native(exc: ApiError) -> A1111Error:
    return A1111Error(exc.status, exc.code, exc.message, exc.headers)


def _unavailable(retry_s: int) -> A1111Error:
    retry = {"Retry-After": str(retry_s)}
    return A1111Error(503, "redis_unavailable", "the job store is unreachable", retry)


router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], route_class=route_class(_unavailable))


def find_sampler(name: str, scheduler: str | None) -> str:
    """The native sampler for an A1111 sampler + schedule type; A1111Error 422 if none."""
    wanted = name.strip().lower()
    sampler = next(
        (s for s in SAMPLERS if wanted in (s.name.lower(), *(a.lower() for a in s.aliases))),
        None,
    )
    if sampler is None:
        known = ", ".join(s.name for s in SAMPLERS if s.listed)
        raise A1111Error(422, "unknown_sampler", f"sampler {name!r} is not available here "
                         f"(available: {known})")  # fmt: skip
    schedule = _SCHEDULER_NAMES.get((scheduler or "automatic").strip().lower())
    native = sampler.schedules.get(schedule or "")
    if native is None:
        offered = ", ".join(sampler.schedules)
        raise A1111Error(422, "unsupported_scheduler", f"sampler {sampler.name!r} with "
                         f"schedule type {scheduler!r} is not available here (with "
                         f"{sampler.name!r}: {offered})")  # fmt: skip
    return native


def a1111_sampler_name(native: str) -> str:
    """The A1111 name shown for a native sampler (info, progress)."""
    return A1111_SAMPLERS.get(native, (native, ""))[0]


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


async def _default_model(c: Caller) -> str | None:
    """The caller's ``sd_model_checkpoint`` choice (POST /options), if any."""
    return text(await c.queue.store.redis.get(c.queue.store.keys.owner_a1111(c.owner)))


async def _served(c: Caller) -> list[str]:
    workers = await c.queue.live_workers()
    return sorted({c.settings.model, *(w.model for w in workers)})


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
    model = overrides.get("sd_model_checkpoint") or await _default_model(c)
    if model:
        fields["model"] = _model_name(str(model))
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


def _model_name(checkpoint: str) -> str:
    """A1111 titles look like ``name.safetensors [hash]``; ldmserve's are the name."""
    return checkpoint.split(" [", 1)[0].strip()


def _info(record_params: dict[str, Any], fields: dict[str, Any], job_id: str,
          ignored: list[str], count: int, interrupted: bool) -> str:  # fmt: skip
    seed = int(record_params.get("seed", 0))
    n = max(count, 1)
    prompt, negative = fields["prompt"], fields["negative_prompt"]
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * n,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * n,
        "seed": seed,
        "all_seeds": [seed + i for i in range(n)],
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": fields["width"],
        "height": fields["height"],
        "sampler_name": a1111_sampler_name(fields["sampler"]),
        "cfg_scale": fields["guidance_scale"],
        "steps": fields["steps"],
        "batch_size": n,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": record_params.get("model"),
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": fields.get("strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": image_infotexts(record_params, n) if count else [],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime()),
        "clip_skip": fields.get("clip_skip") or 1,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
        "interrupted": interrupted,
        "ldmserve_job_id": job_id,
        "ldmserve_ignored_fields": ignored,
    }
    return json.dumps(info)


async def _body(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise A1111Error(422, "invalid_json", "body: not valid JSON") from None
    if not isinstance(data, dict):
        raise A1111Error(422, "invalid_json", "body: expected a JSON object")
    return data


@router.post("/txt2img", include_in_schema=False)
async def txt2img(request: Request) -> JSONResponse:
    """Text to image; answers once the job ended (A1111 is synchronous)."""
    c = caller(request)
    body = await _body(request)
    try:
        fields, ignored = await txt2img_fields(c, body)
    except ApiError as exc:
        raise _from_native(exc) from None
    return await _generate(c, body, fields, ignored, TXT2IMG_DEFAULTS)


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


@router.post("/img2img", include_in_schema=False)
async def img2img(request: Request) -> JSONResponse:
    """Image to image, or inpainting with ``mask`` (white = repaint)."""
    c = caller(request)
    body = await _body(request)
    try:
        fields, ignored = await img2img_fields(c, body)
    except ApiError as exc:
        raise _from_native(exc) from None
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
        raise _from_native(exc) from None
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
    info = _info(record.params, fields, job_id, ignored, len(images),
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
        "sd_model_checkpoint": await _default_model(c) or c.settings.model,
        "sd_checkpoint_hash": None,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
    }


@router.post("/options", include_in_schema=False)
async def set_options(request: Request) -> None:
    """``sd_model_checkpoint`` picks the caller's default model; other options are ignored."""
    c = caller(request)
    body = await _body(request)
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint is None:
        return None
    name = _model_name(str(checkpoint))
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
    app.add_exception_handler(A1111Error, _error_handler)
    app.include_router(router)
