"""The HTTP API through the real FastAPI app (lifespan included) against a real Redis.

The worker side is simulated by calling the queue's worker methods directly.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import typing
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.contract import SAMPLER_NAMES, SamplerName
from service.queue import WorkerInfo
from service.redis_server import RedisServer, free_port
from tests.apps import AppClientFactory, open_app_client, post_job
from tests.queues import Queues

pytestmark = pytest.mark.anyio
Client = httpx.AsyncClient


@pytest.fixture
def make_client(app_client_factory: AppClientFactory) -> AppClientFactory:
    async def make(**overrides: Any) -> tuple[Client, FastAPI]:
        return await app_client_factory(**{"worker_ttl_s": 5.0, **overrides})

    return make


@pytest.fixture
async def api(make_client: Any) -> tuple[Client, FastAPI]:
    return await make_client()


def queue_of(app: FastAPI) -> Queues:
    return Queues.over(app.state.queue.store)


async def run_to_success(app: FastAPI, images: int = 1) -> str:
    q = queue_of(app)
    (claim,) = await q.worker.claim("w1", "demo", 1)
    seed = claim.params["seed"]
    await q.worker.finish(claim, [b"\x89PNG-%d" % i for i in range(images)], [seed + i for i in range(images)])  # fmt: skip
    return claim.job_id


async def test_submit_then_poll_through_every_status(api: tuple[Client, FastAPI]) -> None:
    client, app = api
    r = await post_job(client, seed=7, num_images=2, sampler="ddim", output_format="webp")
    assert r.status_code == 202, r.text
    body = r.json()
    job_id = body["id"]
    assert len(job_id) == 32 and body["status"] == "queued" and body["queue_position"] == 0
    assert body["seed"] == 7 and r.headers["location"] == f"/v1/jobs/{job_id}"
    assert body["links"] == {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}

    view = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert view["status"] == "queued" and view["queue_position"] == 0 and view["images"] == []
    params = view["parameters"]
    # No worker has published the model's capabilities yet: the size stays "the model's native
    # size", resolved by the worker (tests/test_api_capabilities.py covers the other case).
    assert params["width"] is None and params["steps"] == 30 and params["guidance_scale"] == 7.5
    assert params["sampler"] == "ddim" and params["model"] == "demo" and params["seed"] == 7

    q = queue_of(app)
    (claim,) = await q.worker.claim("w1", "demo", 1)
    await q.worker.progress(claim, 5, 30, 2.5)
    view = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert view["status"] == "running" and view["queue_position"] is None
    assert view["progress"] == {"step": 5, "total": 30, "eta_s": 2.5} and view["started_at"]

    await q.worker.finish(claim, [b"img-a", b"img-b"], [7, 8])
    view = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert view["status"] == "succeeded" and view["finished_at"] and view["progress"] is None
    assert [(i["index"], i["seed"], i["content_type"]) for i in view["images"]] == [
        (0, 7, "image/webp"),
        (1, 8, "image/webp"),
    ]
    image = await client.get(view["images"][1]["url"])
    assert image.status_code == 200 and image.content == b"img-b"
    assert image.headers["content-type"] == "image/webp"
    assert (await client.get(f"/v1/jobs/{job_id}/images/2")).status_code == 404


async def test_concurrent_submits_get_distinct_positions(api: tuple[Client, FastAPI]) -> None:
    client, _ = api
    responses = await asyncio.gather(*(post_job(client) for _ in range(30)))
    assert all(r.status_code == 202 for r in responses)
    assert sorted(r.json()["queue_position"] for r in responses) == list(range(30))
    assert len({r.json()["id"] for r in responses}) == 30


async def test_server_picks_and_returns_a_seed(api: tuple[Client, FastAPI]) -> None:
    client, _ = api
    seeds = {(await post_job(client)).json()["seed"] for _ in range(3)}
    assert len(seeds) == 3 and all(0 <= s < 2**32 for s in seeds)


async def test_failed_job_shows_its_error(api: tuple[Client, FastAPI]) -> None:
    client, app = api
    job_id = (await post_job(client)).json()["id"]
    q = queue_of(app)
    (claim,) = await q.worker.claim("w1", "demo", 1)
    await q.worker.fail(claim, "worker_error", "CUDA out of memory")
    view = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert view["status"] == "failed"
    assert view["error"] == {"code": "worker_error", "message": "CUDA out of memory"}
    r = await client.get(f"/v1/jobs/{job_id}/images/0")
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_images"


async def test_images_404_409_410(make_client: Any) -> None:
    client, app = await make_client(result_ttl_s=1)
    unknown = "0" * 32
    for path in (f"/v1/jobs/{unknown}", f"/v1/jobs/{unknown}/images/0", "/v1/jobs/not-an-id"):
        r = await client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    job_id = (await post_job(client)).json()["id"]
    r = await client.get(f"/v1/jobs/{job_id}/images/0")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready"
    await run_to_success(app)
    assert (await client.get(f"/v1/jobs/{job_id}/images/0")).status_code == 200
    await queue_of(app).store.redis.pexpire(queue_of(app).store.keys.images(job_id), 1)
    await asyncio.sleep(0.01)
    r = await client.get(f"/v1/jobs/{job_id}/images/0")
    assert r.status_code == 410 and r.json()["error"]["code"] == "expired"
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded"


async def test_queue_cap_answers_429_with_retry_after(make_client: Any) -> None:
    client, _ = await make_client(max_queue=2, queue_full_retry_after_s=7)
    for _ in range(2):
        assert (await post_job(client)).status_code == 202
    r = await post_job(client)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "queue_full"


async def test_idempotency_key_returns_the_same_job(api: tuple[Client, FastAPI]) -> None:
    client, _ = api
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/v1/jobs", json={"prompt": "a"}, headers=headers)
    again = await client.post("/v1/jobs", json={"prompt": "a"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() and again.headers["idempotent-replayed"] == "true"
    other = await client.post("/v1/jobs", json={"prompt": "b"}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["field"] == "Idempotency-Key"
    fresh = await client.post("/v1/jobs", json={"prompt": "a"})
    assert fresh.json()["id"] != first.json()["id"]


async def test_cancel_queued_and_running(api: tuple[Client, FastAPI]) -> None:
    client, app = api
    running_id = (await post_job(client)).json()["id"]
    queued_id = (await post_job(client)).json()["id"]
    q = queue_of(app)
    (claim,) = await q.worker.claim("w1", "demo", 1)

    r = await client.delete(f"/v1/jobs/{queued_id}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    r = await client.delete(f"/v1/jobs/{running_id}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert await q.worker.canceled([claim.job_id]) == {running_id}
    assert not await q.worker.progress(claim, 1, 30, None)  # the worker drops it
    assert (await client.delete(f"/v1/jobs/{running_id}")).status_code == 200
    assert (await client.delete(f"/v1/jobs/{'0' * 32}")).status_code == 404
    r = await client.get(f"/v1/jobs/{queued_id}/images/0")
    assert r.status_code == 409

    done_id = (await post_job(client)).json()["id"]
    await run_to_success(app)
    r = await client.delete(f"/v1/jobs/{done_id}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_finished"


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        if lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_sse_streams_progress_then_the_final_state(api: tuple[Client, FastAPI]) -> None:
    client, app = api
    job_id = (await post_job(client, steps=3)).json()["id"]
    q = queue_of(app)

    async def drive() -> None:
        channel = q.store.keys.events(job_id)
        while (await q.store.redis.pubsub_numsub(channel))[0][1] == 0:
            await asyncio.sleep(0.01)
        (claim,) = await q.worker.claim("w1", "demo", 1)
        for step in (1, 2, 3):
            await q.worker.progress(claim, step, 3, 0.1 * (3 - step))
        await q.worker.finish(claim, [b"png"], [claim.params["seed"]])

    response, _ = await asyncio.gather(client.get(f"/v1/jobs/{job_id}/events"), drive())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    names = [name for name, _ in events]
    assert names[0] == "job" and events[0][1]["status"] == "queued"
    assert [d["step"] for n, d in events if n == "progress"] == [1, 2, 3]
    assert names[-1] == "done" and events[-1][1]["status"] == "succeeded"
    assert events[-1][1]["images"][0]["url"] == f"/v1/jobs/{job_id}/images/0"
    # A finished job's stream is just its final state.
    again = parse_sse((await client.get(f"/v1/jobs/{job_id}/events")).text)
    assert [n for n, _ in again] == ["job", "done"]
    assert (await client.get(f"/v1/jobs/{'0' * 32}/events")).status_code == 404


async def test_sse_reports_cancel(make_client: Any) -> None:
    client, _ = await make_client(sse_poll_s=0.05)
    job_id = (await post_job(client)).json()["id"]

    async def cancel_later() -> None:
        await asyncio.sleep(0.1)
        await client.delete(f"/v1/jobs/{job_id}")

    response, _ = await asyncio.gather(client.get(f"/v1/jobs/{job_id}/events"), cancel_later())
    events = parse_sse(response.text)
    assert events[-1][0] == "done" and events[-1][1]["status"] == "canceled"


async def test_models_samplers_health_ready(api: tuple[Client, FastAPI]) -> None:
    client, app = api
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_workers"
    assert "retry-after" in r.headers
    assert typing.get_args(SamplerName) == SAMPLER_NAMES
    samplers = (await client.get("/v1/samplers")).json()
    assert tuple(samplers["samplers"]) == SAMPLER_NAMES and samplers["default"] == "euler_a"
    models = (await client.get("/v1/models")).json()["models"]
    assert models == [
        {
            "id": "demo",
            "default": True,
            "workers": 0,
            "max_batch": 0,
            "devices": [],
            "queued": 0,
            "capabilities": None,
        }
    ]

    q = queue_of(app)
    await q.worker.heartbeat(WorkerInfo("w1", "demo", 16, "cuda:0", time.time()))
    await q.worker.heartbeat(WorkerInfo("w2", "sd15", 8, "cuda:1", time.time()))
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["workers"] == 2
    models = {m["id"]: m for m in (await client.get("/v1/models")).json()["models"]}
    assert models["sd15"] == {
        "id": "sd15",
        "default": False,
        "workers": 1,
        "max_batch": 8,
        "devices": ["cuda:1"],
        "queued": 0,
        "capabilities": None,
    }
    # A model a live worker serves is accepted; its job goes to that model's stream.
    r = await post_job(client, model="sd15")
    assert r.status_code == 202
    (claim,) = await q.worker.claim("w2", "sd15", 4)
    assert claim.job_id == r.json()["id"]


async def test_metrics_exposes_the_named_series(api: tuple[Client, FastAPI]) -> None:
    client, app = api
    q = queue_of(app)
    await q.worker.heartbeat(WorkerInfo("w1", "demo", 16, "cpu", time.time()))
    await post_job(client)
    await post_job(client, num_images=2)
    await run_to_success(app)
    await q.worker.record_batch([2, 4])
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in (
        'ldmserve_queue_depth{model="demo"} 1',
        'ldmserve_jobs{status="queued"} 1',
        "ldmserve_jobs_submitted_total 2",
        'ldmserve_jobs_finished_total{status="succeeded"} 1',
        "ldmserve_images_total 1",
        'ldmserve_unet_batch_rows_bucket{le="2.0"} 1',
        'ldmserve_unet_batch_rows_bucket{le="+Inf"} 2',
        "ldmserve_unet_batch_rows_sum 6",
        "ldmserve_unet_batch_rows_count 2",
        "ldmserve_job_latency_seconds_count 1",
        'ldmserve_workers{model="demo"} 1',
        "ldmserve_workers_total 1",
    ):
        assert line in text.splitlines(), line
    assert "# TYPE ldmserve_unet_batch_rows histogram" in text


async def test_redis_down_is_503_with_retry_after() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with AsyncExitStack() as stack:
        client, _ = await open_app_client(stack, url, redis_timeout_s=0.5)
        for method, path in (("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{'0' * 32}"),
                             ("GET", "/readyz"), ("GET", "/metrics")):  # fmt: skip
            r = await client.request(method, path, json={"prompt": "a"})
            assert r.status_code == 503, (path, r.text)
            assert r.headers["retry-after"] == "2"
            assert r.json()["error"]["code"] == "redis_unavailable"
        assert (await client.get("/healthz")).status_code == 200


async def test_api_reconnects_after_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        async with AsyncExitStack() as stack:
            client, _ = await open_app_client(stack, server.url, redis_timeout_s=0.5)
            job_id = (await post_job(client)).json()["id"]
            server.stop()
            assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 503
            server.start()  # same port and data dir: the append-only file brings it back
            r = await client.get(f"/v1/jobs/{job_id}")
            assert r.status_code == 200 and r.json()["status"] == "queued"
    finally:
        server.stop()


async def test_cors_is_off_by_default_and_configurable(make_client: Any) -> None:
    client, _ = await make_client()
    r = await client.get("/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers
    client, _ = await make_client(cors_origins=["https://app.example"])
    r = await client.get("/healthz", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"


async def test_openapi_is_served(api: tuple[Client, FastAPI]) -> None:
    client, _ = api
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/jobs" in spec["paths"] and "/v1/jobs/{job_id}/events" in spec["paths"]


def test_api_imports_no_torch_and_starts_fast() -> None:
    code = (
        "import sys, time\n"
        "import fastapi, redis.asyncio, pydantic_settings\n"
        "t0 = time.process_time()\n"
        "import service.api\n"
        "service.api.create_app()\n"
        "spent = time.process_time() - t0\n"
        "bad = [m for m in ('torch', 'model', 'numpy', 'PIL') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(spent)\n"
    )
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    wall = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    # Our own modules on top of fastapi/redis/pydantic: a small fraction of a second of CPU.
    assert float(result.stdout) < 0.5, result.stdout
    assert wall < 10, wall


async def test_redis_out_of_memory_is_503(api: tuple[Client, FastAPI]) -> None:
    client, app = api
    redis = queue_of(app).store.redis
    await redis.config_set("maxmemory", 1)
    try:
        r = await post_job(client)
    finally:
        await redis.config_set("maxmemory", 0)
    assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
