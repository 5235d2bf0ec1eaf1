"""Live previews: the latent→RGB map, the engine's preview cadence, the queue's preview
record and the SSE ``preview`` events (worker side driven through the queue)."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from PIL import Image

from model import load_pipeline
from model.pipeline import Pipeline
from model.preview import LATENT_RGB, preview_pixels
from service.engine import Engine
from tests.apps import AppClientFactory, post_job
from tests.queues import Queues
from tests.test_api import parse_sse
from tests.test_engine import max_diff, req, solo

pytestmark = pytest.mark.anyio


def test_known_family_uses_its_linear_map() -> None:
    x = torch.zeros(4, 2, 3)
    x[3] = 0.5  # the fourth channel alone: rgb = (1 + 0.5 * row) / 2
    got = preview_pixels(x, "sd1")
    row = np.array(LATENT_RGB["sd1"][3])
    expected = np.round(np.clip((1 + 0.5 * row) / 2, 0, 1) * 255).astype(np.uint8)
    assert got.shape == (2, 3, 3) and got.dtype == np.uint8
    assert (got == expected).all()
    # Mid-trajectory latents are divided by sqrt(a² + b²): the same picture at 3-4-5 scale.
    assert (preview_pixels(x * 5, "sd2-inpainting", a=3.0, b=4.0) == expected).all()


def test_unknown_latents_are_stretched_per_channel() -> None:
    x = torch.stack([torch.linspace(-2, 2, 16).reshape(4, 4)] * 3)
    x[1] *= -1
    got = preview_pixels(x[None], "custom").astype(int)
    assert got[0, 0].tolist() == [0, 255, 0] and got[-1, -1].tolist() == [255, 0, 255]
    grey = preview_pixels(x[:1], "custom")  # one channel: the same in R, G and B
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return load_pipeline("demo", device="cpu")


def test_engine_previews_every_k_evaluations_and_changes_nothing(demo: Pipeline) -> None:
    engine = Engine(demo, max_batch=8)
    watched = req("w", "a fox", steps=7, sampler="euler", width=64, height=96, seed=3,
                  preview_every=3)  # fmt: skip
    plain = req("p", "a fox", steps=7, sampler="euler", width=64, height=96, seed=3)
    handles = [engine.submit(watched), engine.submit(plain)]
    previews = [p for out in engine.run_until_idle() for p in out.previews]
    assert [(h.id, p.step, p.total) for h, p in previews] == [("w", 3, 7), ("w", 6, 7)]
    assert all(p.pixels.shape == (12, 8, 3) for _, p in previews)  # latent resolution (f = 8)
    assert max_diff(previews[0][1].pixels, previews[1][1].pixels) > 0  # the latents moved
    for handle in handles:
        assert max_diff(np.stack(handle.images), solo(demo, plain)) == 0


@pytest.fixture
async def api(app_client_factory: AppClientFactory) -> tuple[httpx.AsyncClient, FastAPI]:
    return await app_client_factory(worker_ttl_s=5.0)


def _png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


async def test_sse_forwards_previews_and_the_latest_on_connect(
    api: tuple[httpx.AsyncClient, FastAPI],
) -> None:
    client, app = api
    r = await post_job(client, steps=4, preview=True)
    job_id = r.json()["id"]
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["parameters"]["preview"] is True
    q = Queues.over(app.state.queue.store)
    (claim,) = await q.worker.claim("w1", "demo", 1)
    assert claim.params["preview"] is True

    def preview(step: int) -> dict[str, Any]:
        buf = io.BytesIO()
        Image.new("RGB", (8, 6), (step * 40, 0, 0)).save(buf, format="PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        return {"step": step, "total": 4, "width": 8, "height": 6, "image": image}

    await q.worker.previews([(claim, preview(1))])
    assert (await app.state.queue.preview(job_id))["step"] == 1

    async def drive() -> None:
        channel = q.store.keys.events(job_id)
        while (await q.store.redis.pubsub_numsub(channel))[0][1] == 0:
            await asyncio.sleep(0.01)
        for step in (2, 3, 4):
            await q.worker.progress(claim, step, 4, None)
            if step < 4:
                await q.worker.previews([(claim, preview(step))])
        await q.worker.finish(claim, [b"png"], [claim.params["seed"]])

    response, _ = await asyncio.gather(client.get(f"/v1/jobs/{job_id}/events"), drive())
    events = parse_sse(response.text)
    names = [n for n, _ in events]
    assert names == ["job", "preview", "progress", "preview", "progress", "preview",
                     "progress", "done"]  # fmt: skip
    shown = [d for n, d in events if n == "preview"]
    assert [d["step"] for d in shown] == [1, 2, 3]  # the stored one first, on connect
    assert all(d["id"] == job_id and _png_size(d["image"]) == (8, 6) for d in shown)
    assert await app.state.queue.preview(job_id) is None  # the end removes it


async def test_a_stale_lease_publishes_no_preview(api: tuple[httpx.AsyncClient, FastAPI]) -> None:
    client, app = api
    job_id = (await post_job(client, preview=True)).json()["id"]
    q = Queues.over(app.state.queue.store)
    (claim,) = await q.worker.claim("w1", "demo", 1)
    await client.delete(f"/v1/jobs/{job_id}")
    await q.worker.previews([(claim, {"step": 1, "total": 2, "image": ""})])
    assert await app.state.queue.preview(job_id) is None
