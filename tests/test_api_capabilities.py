"""Submit-time checks against the model's published capabilities, and image input on
POST /v1/jobs (img2img / inpainting): every refusal is a 422 (or 413) naming the field, and a
refused request never reaches the queue."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import replace
from typing import Any

import pytest
from fastapi import FastAPI
from httpx import AsyncClient
from PIL import Image

from model.demo import build_demo
from service.queue import WorkerInfo
from tests.apps import AppClientFactory, post_job
from tests.queues import Queues
from tests.test_pipeline_image_modes import hard_mask, source_image

pytestmark = pytest.mark.anyio

DEMO_CAPS = build_demo().capabilities
INPAINT_CAPS = replace(DEMO_CAPS, family="sd1-inpainting", modes=("inpaint",), unet_in_channels=9)


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


async def with_caps(
    make: AppClientFactory, caps: Any = DEMO_CAPS, **settings: Any
) -> tuple[AsyncClient, FastAPI]:
    client, app = await make(**settings)
    q = Queues.over(app.state.queue.store)
    info = WorkerInfo("w1", "demo", 16, "cpu", time.time(), capabilities=caps.to_dict())
    await q.worker.heartbeat(info)
    return client, app


async def queued_jobs(app: FastAPI) -> int:
    return int(await app.state.queue.queue_depth("demo"))


async def test_models_publish_capabilities(app_client_factory: AppClientFactory) -> None:
    client, app = await with_caps(app_client_factory)
    (model,) = (await client.get("/v1/models")).json()["models"]
    caps = model["capabilities"]
    assert caps["modes"] == ["txt2img", "img2img", "inpaint"] and caps["latent_factor"] == 8
    assert caps["native_size"] == 256 and caps["max_steps"]["lcm"] == 50
    # kept when the worker is gone, so submit checks still apply while none is up
    await Queues.over(app.state.queue.store).worker.unregister("w1")
    (model,) = (await client.get("/v1/models")).json()["models"]
    assert model["workers"] == 0 and model["capabilities"]["family"] == "demo"


CASES: list[tuple[str, Any, dict[str, Any], int, str, str]] = [
    # (name, capabilities, body, status, code, field)
    ("lcm too many steps", DEMO_CAPS, {"sampler": "lcm", "steps": 60}, 422, "unsupported", "steps"),
    ("side not a latent multiple", replace(DEMO_CAPS, latent_factor=16), {"width": 72, "height": 64},
     422, "unsupported", "width"),
    ("txt2img on an inpainting model", INPAINT_CAPS, {}, 422, "unsupported", "image"),
    ("img2img on an inpainting model", INPAINT_CAPS, {"image": "IMG"}, 422, "unsupported", "mask"),
    ("mask without image", DEMO_CAPS, {"mask": "MASK"}, 422, "validation_error", "mask"),
    ("mask of another size", DEMO_CAPS, {"image": "IMG", "mask": "SMALL"}, 422, "unsupported",
     "mask"),
    ("strength 0", DEMO_CAPS, {"image": "IMG", "strength": 0.0}, 422, "validation_error",
     "strength"),
    ("strength above 1", DEMO_CAPS, {"image": "IMG", "strength": 1.5}, 422, "validation_error",
     "strength"),
    ("strength leaves no step", DEMO_CAPS, {"image": "IMG", "strength": 0.1, "steps": 5}, 422,
     "unsupported", "strength"),
    ("strength without image", DEMO_CAPS, {"strength": 0.5}, 422, "unsupported", "strength"),
    ("undecodable image", DEMO_CAPS, {"image": "bm90IGFuIGltYWdl"}, 422, "invalid_image", "image"),
    ("image not base64", DEMO_CAPS, {"image": "%%%"}, 422, "invalid_image", "image"),
    ("image too many pixels", DEMO_CAPS, {"image": "BIG"}, 422, "image_too_large", "image"),
]  # fmt: skip


def _fill(body: dict[str, Any]) -> dict[str, Any]:
    images = {
        "IMG": b64(source_image(64, 64)),
        "MASK": b64(hard_mask(64, 64)),
        "SMALL": b64(hard_mask(64, 72)),
        "BIG": b64(Image.new("RGB", (300, 300))),
    }
    return {k: images.get(v, v) if isinstance(v, str) else v for k, v in body.items()}


@pytest.mark.parametrize(("name", "caps", "body", "status", "code", "field"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
async def test_refusals_name_the_field_and_queue_nothing(
    app_client_factory: AppClientFactory,
    name: str,
    caps: Any,
    body: dict[str, Any],
    status: int,
    code: str,
    field: str,
) -> None:
    client, app = await with_caps(app_client_factory, caps, max_image_pixels=256 * 256)
    r = await post_job(client, **_fill(body))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == (code, field), error
    assert await queued_jobs(app) == 0, "a refused request must never reach the queue"
    keys = await app.state.queue.store.redis.keys("*:job:*")
    assert keys == []


async def test_sizes_resolved_at_submit(app_client_factory: AppClientFactory) -> None:
    client, _app = await with_caps(app_client_factory)
    r = await post_job(client)
    params = (await client.get(r.json()["links"]["self"])).json()["parameters"]
    assert (params["width"], params["height"]) == (256, 256), "the model's native size"
    r = await post_job(client, image=b64(source_image(70, 75)))  # rounded down to 64 x 72
    params = (await client.get(r.json()["links"]["self"])).json()["parameters"]
    assert (params["width"], params["height"]) == (64, 72)
    assert "image" not in params and params["inputs"] == ["image"]


async def test_input_images_are_stored_beside_the_job(app_client_factory: AppClientFactory) -> None:
    client, app = await with_caps(app_client_factory)
    redis, keys = app.state.queue.store.redis, app.state.queue.store.keys
    image, mask = source_image(64, 64), hard_mask(64, 64)
    r = await post_job(client, image=b64(image, "JPEG"), mask=b64(mask), strength=0.6)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    params = (await client.get(f"/v1/jobs/{job_id}")).json()["parameters"]
    assert params["inputs"] == ["image", "mask"] and params["strength"] == 0.6
    raw = await redis.hgetall(keys.inputs(job_id))
    stored = {k.decode(): Image.open(io.BytesIO(v)) for k, v in raw.items()}
    assert {k: (im.format, im.mode, im.size) for k, im in stored.items()} == {
        "image": ("PNG", "RGB", (64, 64)),
        "mask": ("PNG", "L", (64, 64)),
    }
    assert stored["mask"].tobytes() == mask.tobytes()
    job = await redis.hget(keys.job(job_id), "params")
    assert b"base64" not in job and len(job) < 2000, "images never go into the parameters JSON"
    assert await redis.ttl(keys.inputs(job_id)) > 0
    assert (await client.delete(f"/v1/jobs/{job_id}")).status_code == 200
    ttl = await redis.ttl(keys.inputs(job_id))
    assert 0 < ttl <= app.state.settings.result_ttl_s + app.state.settings.job_ttl_grace_s


async def test_without_capabilities_only_limits_apply(app_client_factory: AppClientFactory) -> None:
    """No worker of the model has ever registered: the API cannot know the model, so it
    checks the deployment's limits and queues; the worker checks the rest (it fails a job it
    cannot run with `invalid_request`, tested end to end in tests/test_e2e_image_modes.py)."""
    client, _app = await app_client_factory()
    r = await post_job(client, sampler="lcm", steps=60)
    assert r.status_code == 202
    assert (await client.get(r.json()["links"]["self"])).json()["parameters"]["width"] is None
    r = await post_job(client, mask=b64(hard_mask()))
    assert r.status_code == 422 and r.json()["error"]["field"] == "mask"


async def test_image_bodies_have_their_own_limit(app_client_factory: AppClientFactory) -> None:
    client, _app = await with_caps(app_client_factory, max_body_bytes=4096)
    big = Image.effect_noise((128, 128), 64).convert("RGB")  # incompressible: > 4 KiB as PNG
    r = await post_job(client, image=b64(big), strength=0.5)
    assert r.status_code == 202, r.text
    r = await post_job(client, prompt="x", negative_prompt="y" * 5000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    client2, _ = await with_caps(app_client_factory, max_body_bytes=4096, max_image_body_bytes=8192)
    r = await post_job(client2, image=b64(big), strength=0.5)
    assert r.status_code == 413
