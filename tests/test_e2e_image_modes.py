"""img2img and inpainting end to end with real processes (redis-server, `ldmserve api`, a demo
worker): jobs succeed and equal `generate()`; capabilities reach the API with the worker's
registration, so what the model cannot run is refused at submit; before any worker of the
model has registered, such a job is accepted and fails in the worker (documented)."""

from __future__ import annotations

import base64
import io
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model import load_pipeline
from service.redis_server import RedisServer
from tests.processes import api_process, live_workers, service_env, spawn, stop, wait_until
from tests.test_e2e import wait_job
from tests.test_pipeline_image_modes import hard_mask, source_image

pytestmark = pytest.mark.slow


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("e2e-images")
    server = RedisServer(root / "redis").start()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        with api_process(server.url, root / "api.log") as base:
            early = httpx.post(f"{base}/v1/jobs", json={"prompt": "x", "sampler": "lcm",
                                                         "steps": 60, "width": 64, "height": 64})  # fmt: skip
            assert early.status_code == 202, "no capabilities known yet: only limits apply"
            workers.append(spawn(["worker", "--model", "demo"], service_env(server.url),
                                 root / "worker.log"))  # fmt: skip
            wait_until(lambda: live_workers(base) == 1, 180, "a live worker")
            yield {"base": base, "early": early.json()["id"]}
    finally:
        for w in workers:
            stop(w)
        server.stop()


def test_before_registration_the_worker_refuses_what_it_cannot_run(stack: dict[str, Any]) -> None:
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        view = wait_job(client, stack["early"])
        assert view["status"] == "failed" and view["error"]["code"] == "invalid_request"
        assert "lcm supports at most 50 steps" in view["error"]["message"]
        r = client.post("/v1/jobs", json={"prompt": "x", "sampler": "lcm", "steps": 60})
        assert r.status_code == 422 and r.json()["error"]["field"] == "steps", r.text
        models = client.get("/v1/models").json()["models"]
        assert models[0]["capabilities"]["modes"] == ["txt2img", "img2img", "inpaint"]


def test_image_jobs_over_http_equal_the_library(stack: dict[str, Any]) -> None:
    image, mask = source_image(64, 64), hard_mask(64, 64)
    bodies = [
        {"prompt": "a red fox", "image": b64(image), "strength": 0.6, "steps": 10,
         "sampler": "euler_a", "seed": 3, "num_images": 2},
        {"prompt": "a door", "image": b64(image), "mask": b64(mask), "steps": 8,
         "sampler": "dpmpp_2m", "seed": 4},
        {"prompt": "a door", "image": b64(image), "mask": b64(mask), "steps": 8, "strength": 0.7,
         "sampler": "ddim", "seed": 5, "keep_unmasked": True},
        {"prompt": "a castle", "width": 64, "height": 64, "steps": 9, "sampler": "heun",
         "seed": 6},
    ]  # fmt: skip
    with httpx.Client(base_url=stack["base"], timeout=60) as client:

        def submit(body: dict[str, Any]) -> str:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            return r.json()["id"]

        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(submit, bodies))
        views = [wait_job(client, job_id) for job_id in ids]
        demo = load_pipeline("demo", device="cpu")
        for body, view in zip(bodies, views, strict=True):
            assert view["status"] == "succeeded", view
            kw = {k: v for k, v in body.items() if k not in ("image", "mask")}
            kw.update(
                image=image if "image" in body else None, mask=mask if "mask" in body else None
            )
            expected = demo.generate(**kw)
            assert len(view["images"]) == len(expected)
            for link, want in zip(view["images"], expected, strict=True):
                got = Image.open(io.BytesIO(client.get(link["url"]).content)).convert("RGB")
                diff = np.abs(np.asarray(got).astype(int) - np.asarray(want).astype(int)).max()
                assert diff <= 2, (body["prompt"], diff)
        kept = np.asarray(
            Image.open(io.BytesIO(client.get(views[2]["images"][0]["url"]).content)).convert("RGB")
        )
        keep = np.asarray(mask) < 128
        np.testing.assert_array_equal(kept[keep], np.asarray(image)[keep])
