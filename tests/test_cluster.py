"""ldmserve on a real local Redis Cluster (three primaries): with LDMSERVE_REDIS_CLUSTER the
keys carry one hash tag, so every script's keys share a slot, and the whole job life —
submit, priorities, claim, progress, SSE, finish, images, cancel, reclaim, webhooks, metrics —
works through any node's URL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI

from service.queue import WorkerInfo
from service.queue.keys import LAYOUT, Keys
from tests import fault_scenarios as fs
from tests.apps import open_app_client
from tests.processes import Stack
from tests.queues import Queues
from tests.redis_cluster import LocalCluster

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
async def api(cluster: LocalCluster) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    cluster.flush()
    async with AsyncExitStack() as stack:
        yield await open_app_client(stack, cluster.url, redis_cluster=True, worker_ttl_s=5.0,
                                    reclaim_after_s=0, webhook_secret="s" * 32,
                                    webhook_allow="93.184.216.0/24")  # fmt: skip


def test_every_key_of_a_deployment_hashes_to_one_slot() -> None:
    keys = Keys.for_settings("ldmserve", cluster=True)
    names = [keys.job("j"), keys.stream("m", "high"), keys.metrics, keys.idem("k", "o"),
             keys.owner_running("o"), keys.webhooks_retry, keys.worker("w")]  # fmt: skip
    names += [keys.pattern(role) for role in LAYOUT]  # every role, present and future
    assert all(n.startswith("{ldmserve}:") for n in names)
    assert Keys.for_settings("ldmserve").job("j") == "ldmserve:job:j"  # single node: as before


async def test_a_job_lives_its_whole_life_on_a_cluster(
    api: tuple[httpx.AsyncClient, FastAPI], cluster: LocalCluster
) -> None:
    client, app = api
    q = Queues.over(app.state.queue.store)
    low = (await client.post("/v1/jobs", json={"prompt": "a", "priority": "low"})).json()["id"]
    body = {"prompt": "b", "priority": "high", "num_images": 2,
            "webhook_url": "http://93.184.216.34/hook"}  # fmt: skip
    r = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 202, r.text
    high = r.json()["id"]
    again = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert again.json()["id"] == high and again.headers["idempotent-replayed"] == "true"
    assert (await client.get(f"/v1/jobs/{high}")).json()["queue_position"] == 0

    await q.worker.heartbeat(WorkerInfo("w1", "demo", 8, "cpu", time.time()))
    assert (await client.get("/v1/models")).json()["models"][0]["workers"] == 1
    (claim,) = await q.worker.claim("w1", "demo", 1, block_ms=100)
    assert claim.job_id == high  # high first
    assert await q.worker.progress_many([(claim, 3, 30, 1.5)]) == set()
    assert (await client.get(f"/v1/jobs/{high}")).json()["progress"]["step"] == 3

    async def drive() -> None:
        await asyncio.sleep(0.5)  # let the SSE request subscribe (cluster pub/sub, any node)
        assert await q.worker.progress(claim, 4, 30, 1.0)
        assert await q.worker.finish(claim, [b"\x89PNG-0", b"\x89PNG-1"])

    sse, _ = await asyncio.gather(client.get(f"/v1/jobs/{high}/events"), drive())
    frames = [line for line in sse.text.splitlines() if line.startswith("event:")]
    assert frames[0] == "event: job" and frames[-1] == "event: done", sse.text
    assert '"status":"succeeded"' in sse.text.split("event: done", 1)[1]
    assert (await client.get(f"/v1/jobs/{high}/images/1")).content == b"\x89PNG-1"

    # The low job: claimed by a worker that dies, reclaimed by another, canceled meanwhile.
    (lost,) = await q.worker.claim("dead", "demo", 1)
    assert lost.job_id == low
    (taken,) = await q.worker.reclaim("w1", "demo", 1)
    assert taken.job_id == low and taken.attempt == 2
    assert (await client.delete(f"/v1/jobs/{low}")).json()["status"] == "canceled"
    assert not await q.worker.finish(taken, [b"late"])

    # Stream entries are gone, the webhook delivery was queued with the final state, and
    # the counters add up; nothing was written outside the one hash slot.
    keys = q.store.keys
    assert await q.store.redis.xlen(keys.stream("demo", "high")) == 0
    assert await q.store.redis.xlen(keys.stream("demo", "low")) == 0
    metrics = (await client.get("/metrics")).text
    assert "ldmserve_jobs_submitted_total 2" in metrics.splitlines()
    node_keys = []
    for port in cluster.ports:
        with redis.Redis(port=port) as node:
            node_keys += [k.decode() for k in node.keys("*")]
    assert node_keys and all(k.startswith("{ldmserve}:") for k in node_keys)
    slots = set()
    with redis.Redis(port=cluster.ports[0]) as node:
        for k in node_keys:
            slots.add(node.execute_command("CLUSTER", "KEYSLOT", k))
    assert len(slots) == 1


async def test_rate_limit_and_caps_hold_on_a_cluster(cluster: LocalCluster) -> None:
    cluster.flush()
    async with AsyncExitStack() as stack:
        client, app = await open_app_client(stack, cluster.url, redis_cluster=True,
                                            rate_limit_per_min=6, rate_limit_burst=2,
                                            max_running_per_key=1)  # fmt: skip
        codes = [(await client.post("/v1/jobs", json={"prompt": "a"})).status_code
                 for _ in range(3)]  # fmt: skip
        assert codes == [202, 202, 429]
        q = Queues.over(app.state.queue.store)
        claims = await q.worker.claim("w1", "demo", 2)
        assert len(claims) == 1  # the running cap parks the second
        records = [json.loads(json.dumps(c.params)) for c in claims]
        assert records[0]["prompt"] == "a"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_worker_kill_on_a_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    """Real `ldmserve api` and workers with LDMSERVE_REDIS_CLUSTER=true, connected through one
    node's URL: two rounds of SIGKILLing the worker holding most jobs mid-denoise. Every job
    succeeds exactly once with the library's images; reclaimed jobs ran twice."""
    cluster.flush()
    env = {"LDMSERVE_DRAIN_TIMEOUT_S": "1", "FAULT_SLOW_STEP_S": "0.3"}
    with Stack(tmp_path, workers=2, env=env, cluster_url=cluster.url) as stack:
        fs.worker_kill(stack, seed=21, rounds=2, per_round=6).assert_nothing_lost()
