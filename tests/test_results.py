"""Result stores against real servers: a directory and SeaweedFS's S3 gateway. Workers write
images there, Redis keeps only their names, the API serves (or redirects to) them, stale
runs leave nothing behind, and old objects are swept."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from service.queue import WorkerInfo
from service.results import ResultStore, open_result_store
from service.results.files import FileResults
from service.settings import Settings
from tests import fault_scenarios as fs
from tests.apps import AppClientFactory
from tests.object_store import BUCKET, SeaweedS3
from tests.processes import Stack
from tests.queues import Queues

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["file", "s3"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Settings for a fresh store of each kind (a new directory / a new S3 prefix)."""
    if request.param == "file":
        return {"result_store": f"file://{tmp_path / 'results'}"}
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    prefix = f"t{time.monotonic_ns()}"
    return {"result_store": f"s3://{BUCKET}/{prefix}", "s3_endpoint_url": server.endpoint_url}


def make_store(spec: dict[str, Any]) -> ResultStore:
    store = open_result_store(Settings(**spec))
    assert store is not None
    return store


async def test_put_get_delete_sweep(store_spec: dict[str, Any]) -> None:
    store = make_store(store_spec)
    await store.put("j1/1-0.png", b"\x89PNG zero", "image/png")
    await store.put("j1/1-1.png", b"\x89PNG one", "image/png")
    await store.put("j2/3-0.webp", b"RIFF", "image/webp")
    assert await store.get("j1/1-1.png") == b"\x89PNG one"
    assert await store.get("j1/9-0.png") is None
    await store.delete(["j1/1-0.png", "j1/never-written.png"])
    assert await store.get("j1/1-0.png") is None
    assert await store.sweep(older_than_s=3600) == 0  # all younger than an hour
    assert await store.get("j2/3-0.webp") == b"RIFF"
    assert await store.sweep(older_than_s=-60) == 2  # "older than a minute from now": all
    assert await store.get("j1/1-1.png") is None and await store.get("j2/3-0.webp") is None


def test_file_store_stays_inside_its_root(tmp_path: Path) -> None:
    store = FileResults(tmp_path)
    with pytest.raises(ValueError, match="leaves the store"):
        store._path("../escape.png")
    with pytest.raises(ValueError, match="absolute"):
        FileResults("relative/dir")


@pytest.mark.parametrize(
    "spec", ["file://relative", "s3://", "S3://b", "http://x", "redis://x", "file:/x"]
)
def test_bad_result_store_settings_are_refused(spec: str) -> None:
    with pytest.raises(ValidationError):
        Settings(result_store=spec)


async def test_images_live_in_the_store_and_redis_keeps_names(
    app_client_factory: AppClientFactory, store_spec: dict[str, Any]
) -> None:
    client, app = await app_client_factory(**store_spec)
    q = Queues.over(app.state.queue.store)
    job = (await client.post("/v1/jobs", json={"prompt": "a", "num_images": 2})).json()["id"]
    await q.worker.heartbeat(WorkerInfo("w1", "demo", 8, "cpu", time.time()))
    (claim,) = await q.worker.claim("w1", "demo", 1)
    assert await q.worker.finish(claim, [b"\x89PNG-a", b"\x89PNG-b"])
    r = await client.get(f"/v1/jobs/{job}/images/1")
    assert r.status_code == 200 and r.content == b"\x89PNG-b"
    assert r.headers["content-type"] == "image/png"
    redis, keys = q.store.redis, q.store.keys
    assert not await redis.exists(keys.images(job))  # no image bytes in Redis
    names = await redis.hget(keys.job(job), "results")
    assert names is not None and f"{job}/{claim.lease}-0.png".encode() in names
    assert (await client.get(f"/v1/jobs/{job}")).json()["images"] != []
    # Past its expiry the image is gone (410) even if the object still exists.
    await redis.hset(keys.job(job), "expires_at", str(time.time() - 1))
    r = await client.get(f"/v1/jobs/{job}/images/0")
    assert r.status_code == 410 and r.json()["error"]["code"] == "expired"


async def test_a_stale_finish_leaves_no_object_behind(
    app_client_factory: AppClientFactory, store_spec: dict[str, Any]
) -> None:
    client, app = await app_client_factory(**{**store_spec, "reclaim_after_s": 0})
    q = Queues.over(app.state.queue.store)
    job = (await client.post("/v1/jobs", json={"prompt": "a"})).json()["id"]
    (stale,) = await q.worker.claim("dead", "demo", 1)  # never heart-beats
    await q.worker.heartbeat(WorkerInfo("w2", "demo", 8, "cpu", time.time()))
    (current,) = await q.worker.reclaim("w2", "demo", 1)
    assert not await q.worker.finish(stale, [b"late"])  # refused: its object is deleted
    results = q.store.results
    assert results is not None
    assert await results.get(f"{job}/{stale.lease}-0.png") is None
    assert await q.worker.finish(current, [b"current"])
    assert (await client.get(f"/v1/jobs/{job}/images/0")).content == b"current"


async def test_input_images_live_in_the_store_too(
    app_client_factory: AppClientFactory, store_spec: dict[str, Any]
) -> None:
    """img2img inputs follow the result store: Redis keeps their names; the worker side reads
    them back; a refused or replayed submit leaves no object; a finished job's are deleted."""
    import base64
    import io

    from PIL import Image

    client, app = await app_client_factory(**store_spec)
    q = Queues.over(app.state.queue.store)
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, format="PNG")
    body = {"prompt": "a", "image": base64.b64encode(buf.getvalue()).decode(), "steps": 4}
    r = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    redis, keys, results = q.store.redis, q.store.keys, q.store.results
    assert results is not None
    stored = await redis.hgetall(keys.inputs(job))
    assert set(stored) == {b"ref:image"} and len(stored[b"ref:image"]) < 100, "no bytes in Redis"
    name = stored[b"ref:image"].decode()
    assert (await q.worker.inputs(job))["image"][:8] == b"\x89PNG\r\n\x1a\n"
    replay = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert replay.json()["id"] == job and await results.get(name) is not None
    refused = await client.post("/v1/jobs", json={**body, "webhook_url": "http://127.0.0.1/x"})
    assert refused.status_code == 422  # webhooks off: refused before anything is stored
    await q.worker.drop_inputs(job)
    assert await results.get(name) is None
    assert await q.worker.inputs(job) == {}, "a lost input is missing, not empty bytes"
    await results.put("_inputs/old-image.png", b"x", "image/png")
    assert await results.sweep(older_than_s=-60) == 0, "inputs keep their own age"
    assert await results.sweep(older_than_s=-60, inputs_older_than_s=-60) == 1


async def test_expire_results_sweeps_old_objects(
    app_client_factory: AppClientFactory, store_spec: dict[str, Any]
) -> None:
    _, app = await app_client_factory(**{**store_spec, "result_ttl_s": 1})
    q = Queues.over(app.state.queue.store)
    results = q.store.results
    assert results is not None
    await results.put("old/1-0.png", b"x", "image/png")
    assert await q.worker.expire_results() == 0  # younger than result_ttl_s + 60 s
    assert await results.get("old/1-0.png") == b"x"
    assert await results.sweep(older_than_s=-1) == 1


async def test_redirect_to_a_presigned_url(
    app_client_factory: AppClientFactory, s3_server: SeaweedS3
) -> None:
    prefix = f"r{time.monotonic_ns()}"
    client, app = await app_client_factory(
        result_store=f"s3://{BUCKET}/{prefix}", s3_endpoint_url=s3_server.endpoint_url,
        result_redirect=True,
    )  # fmt: skip
    q = Queues.over(app.state.queue.store)
    job = (await client.post("/v1/jobs", json={"prompt": "a"})).json()["id"]
    (claim,) = await q.worker.claim("w1", "demo", 1)
    assert await q.worker.finish(claim, [b"\x89PNG-redirected"])
    r = await client.get(f"/v1/jobs/{job}/images/0")
    assert r.status_code == 307, r.text
    location = r.headers["location"]
    assert location.startswith(s3_server.endpoint_url) and "Signature" in location
    async with httpx.AsyncClient() as plain:  # no key, no credentials: the URL is enough
        got = await plain.get(location)
    assert got.status_code == 200 and got.content == b"\x89PNG-redirected"
    assert s3_server.keys(prefix) == [f"{prefix}/{job}/{claim.lease}-0.png"]


async def test_redis_store_keeps_images_inline(app_client_factory: AppClientFactory) -> None:
    client, app = await app_client_factory()
    q = Queues.over(app.state.queue.store)
    assert q.store.results is None
    job = (await client.post("/v1/jobs", json={"prompt": "a"})).json()["id"]
    (claim,) = await q.worker.claim("w1", "demo", 1)
    assert await q.worker.finish(claim, [b"\x89PNG-inline"])
    assert await q.store.redis.hget(q.store.keys.images(job), "0") == b"\x89PNG-inline"
    assert await q.store.redis.hget(q.store.keys.job(job), "results") is None
    assert await q.worker.expire_results() == 0


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_worker_kill_with_results_in_s3(s3_server: SeaweedS3, tmp_path: Path) -> None:
    """The worker-kill fault scenario with every image in SeaweedFS: every accepted job
    succeeds exactly once with the library's images (read back through the API from S3),
    and Redis holds no image bytes."""
    prefix = f"kill{time.monotonic_ns()}"
    env = {"LDMSERVE_DRAIN_TIMEOUT_S": "1", "FAULT_SLOW_STEP_S": "0.3",
           "LDMSERVE_RESULT_STORE": f"s3://{BUCKET}/{prefix}",
           "LDMSERVE_S3_ENDPOINT_URL": s3_server.endpoint_url}  # fmt: skip
    with Stack(tmp_path, workers=2, env=env) as stack:
        fs.worker_kill(stack, seed=31, rounds=2, per_round=6).assert_nothing_lost()
        client = stack.redis_client()
        try:
            assert not list(client.scan_iter(stack.keys.images("*")))
        finally:
            client.close()
    assert len(s3_server.keys(prefix)) >= 12
