"""Priorities and fair share against a real Redis: high jobs overtake a low burst, a key's
priority ceiling is enforced at submit, and the per-key running cap shares a worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from service.auth import hash_key
from service.metrics import render, snapshot
from service.queue import Claim, WorkerInfo
from service.settings import Settings
from tests.apps import AppClientFactory
from tests.queues import Queues

pytestmark = pytest.mark.anyio
MODEL = "demo"
BATCH = 8  # jobs a worker takes per claim here (its free rows)


@pytest.fixture
async def make_queues(redis_url: str) -> AsyncIterator[Any]:
    clients: list[Redis] = []

    def make(**overrides: Any) -> Queues:
        client = Redis.from_url(redis_url)
        clients.append(client)
        base: dict[str, Any] = {"reclaim_after_s": 0, "max_queue": 500}
        return Queues.on(client, Settings(**{**base, **overrides}))

    yield make
    for client in clients:
        await client.aclose()


async def submit(q: Queues, owner: str = "anonymous", priority: str = "normal") -> str:
    job_id = uuid.uuid4().hex
    params = {"prompt": "a", "seed": 1, "priority": priority}
    await q.api.submit(params, model=MODEL, job_id=job_id, owner=owner)
    return job_id


async def take(q: Queues, worker: str, count: int) -> list[Claim]:
    """What a worker loop does for ``count`` free slots: reclaim, then claim."""
    await q.worker.heartbeat(WorkerInfo(worker, MODEL, 16, "cpu", time.time()))
    claims = await q.worker.reclaim(worker, MODEL, count)
    return claims + await q.worker.claim(worker, MODEL, count - len(claims))


async def test_a_high_job_overtakes_a_low_burst_within_one_batch(make_queues: Any) -> None:
    q = make_queues()
    low = [await submit(q, priority="low") for _ in range(40)]
    first = await take(q, "w1", BATCH)  # the worker's batch fills with the burst
    assert [c.job_id for c in first] == low[:BATCH]
    high = await submit(q, priority="high")
    normal = await submit(q)
    assert (await q.api.get(high)).queue_position == 0  # ahead of 32 queued low jobs
    assert (await q.api.get(normal)).queue_position == 1
    assert (await q.api.get(low[BATCH])).queue_position == 2
    for claim in first[:2]:  # two rows free up: the very next claim takes high, then normal
        await q.worker.finish(claim, [b"png"])
    nxt = await take(q, "w1", 2)
    assert [c.job_id for c in nxt] == [high, normal]


async def test_priority_survives_a_hand_back_and_a_reclaim(make_queues: Any) -> None:
    q = make_queues()
    low = [await submit(q, priority="low") for _ in range(3)]
    high = await submit(q, priority="high")
    (claim,) = await take(q, "w1", 1)
    assert claim.job_id == high
    assert await q.worker.release(claim)  # drained: queued again, still high
    assert (await q.api.get(high)).queue_position == 0
    again = await take(q, "w2", 2)
    assert [c.job_id for c in again] == [high, low[0]]
    assert await q.worker.finish(again[0], [b"png"])
    assert await q.store.redis.xlen(q.store.keys.stream(MODEL, "high")) == 0


async def test_two_tenants_share_a_worker(make_queues: Any) -> None:
    """alice submits 12 jobs before bob's 4; with max_running_per_key=4 an 8-slot worker
    runs 4 of each, and each finished job frees a slot for its own key."""
    q = make_queues(max_running_per_key=4)
    alice = [await submit(q, "alice") for _ in range(12)]
    bob = [await submit(q, "bob") for _ in range(4)]
    running: list[Claim] = []
    for _ in range(4):  # a few loop turns: deferred entries are passed over
        running += await take(q, "w1", BATCH - len(running))
    owners = sorted([(await q.api.get(c.job_id)).owner for c in running])
    assert owners == ["alice"] * 4 + ["bob"] * 4
    assert {c.job_id for c in running} == set(alice[:4]) | set(bob)
    # alice's deferred jobs keep their order and wait for her own slots.
    done = next(c for c in running if c.job_id == alice[0])
    assert await q.worker.finish(done, [b"png"])
    (nxt,) = await take(q, "w1", 1)
    assert nxt.job_id == alice[4]
    assert await take(q, "w1", 3) == []  # alice at her cap again, bob has nothing queued
    assert (await q.api.get(alice[5])).status == "queued"
    assert (await q.api.get(alice[5])).queue_position == 0
    snap = await snapshot(q.api)
    assert int(snap["counters"]["jobs_deferred_running_cap"]) >= 8  # alice[4:] at least once
    assert snap["stream_length"]["demo"] == 15 and snap["queued"]["demo"] == 7  # 8 running
    text = render(snap)
    assert any(line.startswith("ldmserve_jobs_deferred_total ") for line in text.splitlines())


async def test_without_a_cap_one_tenant_takes_the_whole_batch(make_queues: Any) -> None:
    q = make_queues(max_running_per_key=0)
    alice = [await submit(q, "alice") for _ in range(12)]
    for _ in range(4):
        await submit(q, "bob")
    running = await take(q, "w1", BATCH)
    assert [c.job_id for c in running] == alice[:BATCH]


async def test_canceled_deferred_job_leaves_the_stream(make_queues: Any) -> None:
    q = make_queues(max_running_per_key=1)
    first, second = await submit(q, "alice"), await submit(q, "alice")
    (claim,) = await take(q, "w1", 2)
    assert claim.job_id == first
    assert await q.api.cancel(second) == "canceled"
    assert await q.worker.finish(claim, [b"png"])
    assert await take(q, "w1", 2) == []
    assert await q.store.redis.xlen(q.store.keys.stream(MODEL)) == 0


async def test_submit_refuses_an_unknown_priority(make_queues: Any) -> None:
    q = make_queues()
    with pytest.raises(ValueError, match="priority"):
        await submit(q, priority="urgent")


# ---------------------------------------------------------------------------- HTTP

KEYS = {"ops": "ops-key", "web": "web-key", "batch": "batch-key"}
API_KEYS = (
    f"ops:{hash_key('ops-key')}:high,web:{hash_key('web-key')},batch:{hash_key('batch-key')}:low"
)


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


async def test_a_keys_priority_ceiling_is_enforced(app_client_factory: AppClientFactory) -> None:
    client, _ = await app_client_factory(api_keys=API_KEYS)
    allowed = {"ops": ["high", "normal", "low"], "web": ["normal", "low"], "batch": ["low"]}
    for name, ok in allowed.items():
        for priority in ("high", "normal", "low"):
            r = await client.post("/v1/jobs", json={"prompt": "a", "priority": priority},
                                  headers=bearer(name))  # fmt: skip
            if priority in ok:
                assert r.status_code == 202, (name, priority, r.text)
            else:
                assert r.status_code == 403, (name, priority, r.text)
                assert r.json()["error"] == {
                    "code": "priority_not_allowed",
                    "message": f"priority: this key may use {ok[0]!r} at most",
                    "field": "priority",
                }
    r = await client.post("/v1/jobs", json={"prompt": "a", "priority": "urgent"},
                          headers=bearer("ops"))  # fmt: skip
    assert r.status_code == 422
    # No priority asked: the default (normal) is above batch's ceiling, so the job runs at the
    # ceiling instead of being refused (compat clients such as OpenAI's SDK send none).
    r = await client.post("/v1/jobs", json={"prompt": "a"}, headers=bearer("batch"))
    assert r.status_code == 202, r.text
    view = (await client.get(r.headers["location"], headers=bearer("batch"))).json()
    assert view["parameters"]["priority"] == "low"


async def test_priority_is_a_job_parameter(app_client_factory: AppClientFactory) -> None:
    client, _ = await app_client_factory()
    for priority in ("low", "high"):
        await client.post("/v1/jobs", json={"prompt": "a", "priority": priority})
    jobs = await client.post("/v1/jobs", json={"prompt": "a"})
    view = (await client.get(jobs.headers["location"])).json()
    assert view["parameters"]["priority"] == "normal" and view["queue_position"] == 1
