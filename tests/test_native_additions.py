"""Native API additions: ``Prefer: wait=N``, ``GET /v1/jobs``, A1111 infotext in PNGs.

Real FastAPI app over ASGI and a real Redis; the test plays the worker through the real
queue (claim / progress / finish), as tests/test_api.py does.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from service.api_jobs import prefer_wait_s
from service.infotext import image_infotexts, infotext
from service.settings import Settings
from tests.apps import AppClientFactory, post_job
from tests.conftest import LIVE_KEYS
from tests.queues import Queues

pytestmark = pytest.mark.anyio


def queue_of(app: FastAPI) -> Queues:
    return Queues.over(app.state.queue.store)


async def finish_next(app: FastAPI, delay_s: float = 0.0) -> str:
    """Claim the next demo job and finish it (after ``delay_s``) with fake image bytes."""
    await asyncio.sleep(delay_s)
    q = queue_of(app).worker
    (claim,) = await q.claim("w1", "demo", 1, block_ms=3000)
    await q.finish(claim, [b"\x89PNG-0"], [claim.params["seed"]])
    return claim.job_id


def test_prefer_wait_parsing() -> None:
    s = Settings(max_prefer_wait_s=30)
    assert prefer_wait_s("wait=10", s) == 10
    assert prefer_wait_s("respond-async, wait=5", s) == 5
    assert prefer_wait_s('wait="7"; foo', s) == 7
    assert prefer_wait_s("wait=100", s) == 30  # bounded by the setting
    assert prefer_wait_s("nowait=5", s) == 0
    assert prefer_wait_s("wait=soon", s) == 0
    assert prefer_wait_s(None, s) == 0


async def test_prefer_wait_answers_200_with_the_finished_job(
    app_client_factory: AppClientFactory,
) -> None:
    client, app = await app_client_factory()
    worker = asyncio.create_task(finish_next(app, delay_s=0.3))
    r = await client.post(
        "/v1/jobs", json={"prompt": "a fox", "seed": 3}, headers={"Prefer": "wait=20"}
    )
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["id"] == await worker
    assert view["status"] == "succeeded"
    assert view["images"][0]["url"] == f"/v1/jobs/{view['id']}/images/0"
    assert r.headers["Location"] == f"/v1/jobs/{view['id']}"


async def test_prefer_wait_times_out_into_the_usual_202(
    app_client_factory: AppClientFactory,
) -> None:
    client, _ = await app_client_factory(max_prefer_wait_s=0.5)
    r = await client.post("/v1/jobs", json={"prompt": "a fox"}, headers={"Prefer": "wait=60"})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"


async def _ids(
    client: httpx.AsyncClient, headers: dict[str, str] | None = None, **params: Any
) -> tuple[list[str], str | None]:
    r = await client.get("/v1/jobs", params=params, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    return [j["id"] for j in body["jobs"]], body["next_cursor"]


async def test_list_own_jobs_newest_first_with_cursor_and_status(
    app_client_factory: AppClientFactory,
) -> None:
    keys = "alice:" + _sha("ka") + ",bob:" + _sha("kb")
    client, app = await app_client_factory(api_keys=keys)
    alice = {"Authorization": "Bearer ka"}
    bob = {"Authorization": "Bearer kb"}
    client.headers.update(alice)
    ids = [(await post_job(client, seed=i)).json()["id"] for i in range(5)]
    bob_job = (await client.post("/v1/jobs", json={"prompt": "x"}, headers=bob)).json()["id"]
    finished = await finish_next(app)  # the oldest of alice's jobs
    assert finished == ids[0]

    first, cursor = await _ids(client, limit=2)
    assert first == [ids[4], ids[3]] and cursor is not None
    second, cursor = await _ids(client, limit=2, cursor=cursor)
    assert second == [ids[2], ids[1]] and cursor is not None
    third, cursor = await _ids(client, limit=2, cursor=cursor)
    assert third == [ids[0]] and cursor is None

    assert (await _ids(client, status="succeeded"))[0] == [ids[0]]
    assert (await _ids(client, status="queued"))[0] == ids[:0:-1]
    r = await client.get("/v1/jobs", params={"status": "queued", "limit": 1})
    assert r.json()["jobs"][0]["queue_position"] == 3  # ids[1..3] are ahead of ids[4]
    assert (await _ids(client, headers=bob))[0] == [bob_job]  # only the caller's own
    r = await client.get("/v1/jobs", params={"status": "exploded"})
    assert r.status_code == 422
    r = await client.get("/v1/jobs", params={"cursor": "abc"})
    assert r.status_code == 422


async def test_expired_jobs_leave_the_list(app_client_factory: AppClientFactory) -> None:
    client, app = await app_client_factory()
    ids = [(await post_job(client)).json()["id"] for _ in range(2)]
    await queue_of(app).store.redis.delete(queue_of(app).store.keys.job(ids[0]))
    assert (await _ids(client))[0] == [ids[1]]
    assert (
        await queue_of(app).store.redis.zcard(queue_of(app).store.keys.owner_jobs("anonymous")) == 1
    )


def test_infotext_is_a1111s_format() -> None:
    params = {
        "prompt": "a lighthouse, at dusk",
        "negative_prompt": "blurry",
        "steps": 20,
        "sampler": "dpmpp_2m_karras",
        "guidance_scale": 7.5,
        "seed": 42,
        "width": 512,
        "height": 768,
        "model": "demo",
    }
    assert infotext(params, 42) == (
        "a lighthouse, at dusk\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
        "Size: 512x768, Model: demo, Version: ldmserve 0.1.0"
    )
    texts = image_infotexts({**params, "negative_prompt": "", "sampler": "euler_a"}, 2)
    assert texts[1] == (
        "a lighthouse, at dusk\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 43, "
        "Size: 512x768, Model: demo, Version: ldmserve 0.1.0"
    )
    assert 'Model: "x,y"' in infotext({**params, "model": "C:\\m\\x,y.ckpt"}, 1)
    assert "Model: v1-5-pruned-emaonly," in infotext(
        {**params, "model": "/models/v1-5-pruned-emaonly.safetensors"}, 1
    )
    assert "Model: runwayml/stable-diffusion-v1-5," in infotext(
        {**params, "model": "runwayml/stable-diffusion-v1-5"}, 1
    )


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


@pytest.mark.slow
def test_prefer_wait_through_uvicorn_and_a_real_worker(live_stack: Any) -> None:
    """The 200 body arrives whole over a real socket, with the PNG's parameters chunk."""
    headers = {"Authorization": f"Bearer {LIVE_KEYS['other']}", "Prefer": "wait=120"}
    body = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2, "seed": 21}
    with httpx.Client(base_url=live_stack.base, headers=headers, timeout=150) as client:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["status"] == "succeeded" and view["images"][0]["seed"] == 21
        png = client.get(view["images"][0]["url"]).content
    text = Image.open(io.BytesIO(png)).info["parameters"]
    assert text == (
        "a harbour\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 21, Size: 64x64, "
        "Model: demo, Version: ldmserve 0.1.0"
    )
