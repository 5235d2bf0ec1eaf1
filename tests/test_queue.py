"""The queue's two sides against a real Redis: the worker-side contract and its races."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from service.metrics import snapshot
from service.queue import (
    Claim,
    IdempotencyMismatch,
    QueueFull,
    WorkerInfo,
    claim_scripts,
    new_worker_id,
)
from service.queue.keys import GROUP
from service.redis_server import start_embedded
from service.settings import Settings
from tests.queues import DEFAULT_KEYS, Queues

pytestmark = pytest.mark.anyio
MODEL = "demo"


def _settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "reclaim_after_s": 0.05,
        "worker_ttl_s": 0.3,
        "heartbeat_interval_s": 0.1,
        "max_queue": 50,
    }
    return Settings(**{**base, **overrides})


@pytest.fixture
async def make_queue(redis_url: str) -> AsyncIterator[Any]:
    clients: list[Redis] = []

    def make(**overrides: Any) -> Queues:
        client = Redis.from_url(redis_url)
        clients.append(client)
        return Queues.on(client, _settings(**overrides))

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def q(make_queue: Any) -> Queues:
    return make_queue()


async def submit(q: Queues, **params: Any) -> str:
    job_id = uuid.uuid4().hex
    body = {"prompt": "a cat", "seed": 1, "num_images": 1, "output_format": "png", **params}
    result = await q.api.submit(body, model=MODEL, job_id=job_id)
    assert result.created and result.job_id == job_id
    return job_id


async def worker(q: Queues, worker_id: str = "w1") -> WorkerInfo:
    info = WorkerInfo(worker_id, MODEL, 16, "cpu", time.time())
    await q.worker.heartbeat(info)
    return info


async def test_submit_claim_progress_finish(q: Queues) -> None:
    ids = [await submit(q, seed=i) for i in range(3)]
    assert [(await q.api.get(i)).queue_position for i in ids] == [0, 1, 2]
    await worker(q)
    claims = await q.worker.claim("w1", MODEL, count=2)
    assert [c.job_id for c in claims] == ids[:2]
    assert claims[0].attempt == 1 and claims[0].params["seed"] == 0
    record = await q.api.get(ids[0])
    assert record.status == "running" and record.worker == "w1" and record.queue_position is None
    assert (await q.api.get(ids[2])).queue_position == 0

    assert await q.worker.progress(claims[0], 3, 30, 1.5)
    record = await q.api.get(ids[0])
    assert (record.step, record.total, record.eta_s) == (3, 30, 1.5)
    assert (
        await q.worker.progress_many([(claims[0], 4, 30, None), (claims[1], 1, 30, 2.0)]) == set()
    )

    assert await q.worker.finish(claims[0], [b"img0", b"img1"], [0, 1])
    record = await q.api.get(ids[0])
    assert record.status == "succeeded" and record.image_count == 2 and record.seeds == [0, 1]
    assert await q.api.image(ids[0], 1) == b"img1"
    assert await q.store.redis.ttl(q.store.keys.images(ids[0])) > 0
    assert await q.store.redis.ttl(q.store.keys.job(ids[0])) > await q.store.redis.ttl(
        q.store.keys.images(ids[0])
    )
    # The acked entry is gone from the stream: memory stays bounded.
    assert await q.store.redis.xlen(q.store.keys.stream(MODEL)) == 2
    # A second finish with the same (now stale) claim is refused.
    assert not await q.worker.finish(claims[0], [b"x"], [0])


async def test_claim_reads_only_count(q: Queues) -> None:
    for _ in range(5):
        await submit(q)
    assert len(await q.worker.claim("w1", MODEL, count=2)) == 2
    assert await q.worker.claim("w1", MODEL, count=0) == []
    assert len(await q.worker.claim("w2", MODEL, count=10)) == 3
    assert await q.worker.claim("w1", MODEL, count=4) == []


async def test_claim_blocks_until_a_job_arrives(q: Queues, make_queue: Any) -> None:
    other = make_queue()
    waiter = asyncio.create_task(q.worker.claim("w1", MODEL, count=1, block_ms=2000))
    await asyncio.sleep(0.1)
    job_id = await submit(other)
    claims = await asyncio.wait_for(waiter, 3)
    assert [c.job_id for c in claims] == [job_id]


async def test_fail_and_failure_fields(q: Queues) -> None:
    job_id = await submit(q)
    (claim,) = await q.worker.claim("w1", MODEL, 1)
    assert await q.worker.fail(claim, "bad_input", "prompt too spicy")
    record = await q.api.get(job_id)
    assert (record.status, record.error_code, record.error) == (
        "failed",
        "bad_input",
        "prompt too spicy",
    )
    assert not await q.worker.progress(claim, 1, 2, None)


async def test_queue_cap_and_idempotency(make_queue: Any) -> None:
    q = make_queue(max_queue=2)
    first = await q.api.submit(
        {"prompt": "a"}, model=MODEL, job_id="a" * 32, idempotency_key="k", digest="d1"
    )
    again = await q.api.submit(
        {"prompt": "a"}, model=MODEL, job_id="b" * 32, idempotency_key="k", digest="d1"
    )
    assert first.created and not again.created and again.job_id == "a" * 32
    with pytest.raises(IdempotencyMismatch):
        await q.api.submit(
            {"prompt": "b"}, model=MODEL, job_id="c" * 32, idempotency_key="k", digest="d2"
        )
    await submit(q)
    with pytest.raises(QueueFull):
        await submit(q)
    # Running jobs do not count against the cap.
    await q.worker.claim("w1", MODEL, 1)
    await submit(q)


async def test_cancel_queued_removes_it_from_the_queue(q: Queues) -> None:
    a, b = await submit(q), await submit(q)
    assert await q.api.cancel(a) == "canceled"
    assert await q.api.cancel(a) == "canceled"  # idempotent
    assert await q.api.cancel("f" * 32) == "missing"
    assert (await q.api.get(b)).queue_position == 0
    claims = await q.worker.claim("w1", MODEL, 5)
    assert [c.job_id for c in claims] == [b]
    assert (await q.api.get(a)).status == "canceled"


async def test_cancel_between_read_and_activate_skips_the_job(q: Queues) -> None:
    job_id = await submit(q)
    await q.worker.ensure_group(MODEL)
    # Simulate the race by reading the entry first, then canceling, then activating.
    raw = await q.store.redis.xreadgroup(GROUP, "w1", {q.store.keys.stream(MODEL): ">"}, count=1)
    assert await q.api.cancel(job_id) == "canceled"
    entry_id = raw[0][1][0][0].decode()
    rows = await q.store.run(
        claim_scripts.ACTIVATE,
        worker="w1",
        now="1",
        model=MODEL,
        max_running=0,
        rest=["normal", entry_id, job_id],
    )
    assert rows == []
    assert (await q.api.get(job_id)).status == "canceled"


async def test_cancel_running_is_seen_by_the_worker(q: Queues) -> None:
    job_id, other = await submit(q), await submit(q)
    claims = await q.worker.claim("w1", MODEL, 2)
    assert await q.worker.canceled([job_id, other]) == set()
    assert await q.api.cancel(job_id) == "canceled"
    assert await q.worker.canceled([job_id, other]) == {job_id}
    assert await q.worker.is_canceled(job_id) and not await q.worker.is_canceled(other)
    assert await q.worker.progress_many([(claims[0], 2, 10, None), (claims[1], 2, 10, None)]) == {
        job_id
    }
    assert not await q.worker.finish(claims[0], [b"x"], [1])
    assert (await q.api.get(job_id)).status == "canceled"
    assert await q.api.image(job_id, 0) is None
    # Its entry left the pending list: nobody reclaims a canceled job.
    pending = await q.store.redis.xpending(q.store.keys.stream(MODEL), GROUP)
    assert pending["pending"] == 1
    assert await q.api.cancel(other) == "canceled"
    assert await q.api.cancel(other) == "canceled"


async def test_finished_job_cannot_be_canceled(q: Queues) -> None:
    job_id = await submit(q)
    (claim,) = await q.worker.claim("w1", MODEL, 1)
    await q.worker.finish(claim, [b"png"], [1])
    assert await q.api.cancel(job_id) == "succeeded"


async def test_dead_workers_job_is_reclaimed_and_guarded(q: Queues) -> None:
    job_id = await submit(q)
    await worker(q, "dead")
    (old,) = await q.worker.claim("dead", MODEL, 1)
    await q.worker.unregister("dead")  # as if its heartbeat expired
    await worker(q, "w2")
    await asyncio.sleep(0.06)
    (new,) = await q.worker.reclaim("w2", MODEL, 4)
    assert (new.job_id, new.attempt, new.worker_id) == (job_id, 2, "w2")
    assert new.lease > old.lease
    record = await q.api.get(job_id)
    assert (record.status, record.worker, record.attempt) == ("running", "w2", 2)
    # The old owner wakes up: every write of its stale claim is refused.
    assert not await q.worker.progress(old, 9, 10, None)
    assert not await q.worker.finish(old, [b"stale"], [1])
    assert not await q.worker.fail(old, "x", "y")
    assert not await q.worker.release(old)
    assert await q.worker.finish(new, [b"fresh"], [1])
    assert await q.api.image(job_id, 0) == b"fresh"
    snap = await snapshot(q.api)
    assert snap["counters"]["jobs_reclaimed"] == "1"


async def test_slow_but_alive_worker_keeps_its_job(make_queue: Any) -> None:
    q = make_queue(worker_ttl_s=2.0)  # no flake if the test machine stalls briefly
    job_id = await submit(q)
    await worker(q, "slow")
    (claim,) = await q.worker.claim("slow", MODEL, 1)
    await worker(q, "w2")
    for _ in range(3):  # far past reclaim_after_s, but it keeps beating
        await asyncio.sleep(0.06)
        await worker(q, "slow")
        assert await q.worker.reclaim("w2", MODEL, 4) == []
    assert await q.worker.finish(claim, [b"ok"], [1])
    assert (await q.api.get(job_id)).status == "succeeded"


async def test_heartbeat_expiry_makes_jobs_reclaimable(q: Queues) -> None:
    job_id = await submit(q)
    await worker(q, "w1")
    await q.worker.claim("w1", MODEL, 1)
    assert [w.worker_id for w in await q.api.live_workers()] == ["w1"]
    await asyncio.sleep(0.35)  # worker_ttl_s = 0.3: its heartbeat key expires
    assert await q.api.live_workers() == []
    await worker(q, "w2")
    assert [c.job_id for c in await q.worker.reclaim("w2", MODEL, 1)] == [job_id]


async def test_reclaim_respects_idle_time(make_queue: Any) -> None:
    q = make_queue(reclaim_after_s=30)
    await submit(q)
    await q.worker.claim("gone", MODEL, 1)
    assert await q.worker.reclaim("w2", MODEL, 4) == []


async def test_max_attempts_fails_the_job(make_queue: Any) -> None:
    q = make_queue(max_attempts=2)
    job_id = await submit(q)
    claims: list[Claim] = await q.worker.claim("d1", MODEL, 1)
    await asyncio.sleep(0.06)
    claims = await q.worker.reclaim("d2", MODEL, 1)
    assert claims[0].attempt == 2
    await asyncio.sleep(0.06)
    assert await q.worker.reclaim("d3", MODEL, 1) == []
    record = await q.api.get(job_id)
    assert record.status == "failed" and record.error_code == "max_attempts"
    assert "giving up after 2 attempt" in (record.error or "")
    assert await q.store.redis.xlen(q.store.keys.stream(MODEL)) == 0


async def test_release_hands_the_job_back_without_counting_an_attempt(q: Queues) -> None:
    first, second = await submit(q), await submit(q)
    await worker(q, "w1")
    (claim,) = await q.worker.claim("w1", MODEL, 1)
    assert await q.worker.release(claim)
    record = await q.api.get(first)
    assert (record.status, record.attempt, record.queue_position) == ("queued", 0, 0)
    await worker(q, "w2")
    (again,) = await q.worker.reclaim("w2", MODEL, 1)  # no waiting: released entries are idle
    assert (again.job_id, again.attempt) == (first, 1)
    assert [c.job_id for c in await q.worker.claim("w2", MODEL, 5)] == [second]


async def test_events_are_published(q: Queues) -> None:
    job_id = await submit(q)
    pubsub = q.store.redis.pubsub()
    await pubsub.subscribe(q.store.keys.events(job_id))
    await pubsub.get_message(timeout=1)  # subscribe confirmation
    (claim,) = await q.worker.claim("w1", MODEL, 1)
    await q.worker.progress(claim, 1, 2, 0.5)
    await q.worker.finish(claim, [b"x"], [1])
    got = []
    for _ in range(3):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        got.append(message["data"])
    await pubsub.aclose()
    assert b'"running"' in got[0] and b'"progress"' in got[1] and b'"succeeded"' in got[2]


async def test_metrics_snapshot_counts(q: Queues) -> None:
    await worker(q)
    a, _b = await submit(q), await submit(q)
    (claim,) = await q.worker.claim("w1", MODEL, 1)
    await q.worker.record_batch([2, 16])
    await q.worker.record_batch(3)
    snap = await snapshot(q.api)
    assert snap["running"] == 1 and snap["queued"] == {MODEL: 1}
    counters = snap["counters"]
    assert counters["unet_batch_rows_count"] == "3" and counters["unet_batch_rows_sum"] == "21"
    assert counters["unet_batch_rows_bucket:16.0"] == "1"
    await q.worker.finish(claim, [b"x", b"y"], [1, 2])
    counters = (await snapshot(q.api))["counters"]
    assert counters["jobs_succeeded"] == "1" and counters["images_generated"] == "2"
    assert counters["job_latency_seconds_count"] == "1"
    assert a


async def test_group_recreated_after_redis_loses_it(q: Queues) -> None:
    await submit(q)
    assert len(await q.worker.claim("w1", MODEL, 1)) == 1
    await q.store.redis.flushall()
    job_id = await submit(q)
    assert [c.job_id for c in await q.worker.claim("w1", MODEL, 1)] == [job_id]


async def test_prune_consumers_keeps_live_and_busy_ones(q: Queues) -> None:
    for _ in range(4):
        await submit(q)
    await worker(q, "live-busy")
    await worker(q, "live-idle")
    for name in ("live-busy", "dead-busy", "live-idle", "dead-idle"):
        (claim,) = await q.worker.claim(name, MODEL, 1)
        if name.endswith("idle"):  # it finished its job and holds nothing
            assert await q.worker.finish(claim, [b"x"])
    assert await q.worker.prune_consumers(MODEL) == 1
    consumers = await q.store.redis.xinfo_consumers(q.store.keys.stream(MODEL), GROUP)
    assert {c["name"] for c in consumers} == {b"live-busy", b"live-idle", b"dead-busy"}


async def test_finish_defaults_seeds_to_the_noise_convention(q: Queues) -> None:
    job_id = await submit(q, seed=41, num_images=3)
    (claim,) = await q.worker.claim("w1", MODEL, 1)
    assert await q.worker.finish(claim, [b"a", b"b", b"c"])
    assert (await q.api.get(job_id)).seeds == [41, 42, 43]


def test_embedded_redis_keeps_jobs_across_restarts(tmp_path: Path) -> None:
    first = start_embedded(tmp_path)
    try:
        client = redis.Redis.from_url(first.url)
        client.hset(DEFAULT_KEYS.job("x"), "status", "queued")
        client.close()
    finally:
        first.stop()
    assert (tmp_path / "redis").is_dir()
    second = start_embedded(tmp_path)
    try:
        client = redis.Redis.from_url(second.url)
        assert client.hget(DEFAULT_KEYS.job("x"), "status") == b"queued"
        client.close()
    finally:
        second.stop()
    assert second.process is None


def test_worker_ids_are_unique_per_process_start() -> None:
    assert new_worker_id() != new_worker_id()


async def test_concurrent_workers_never_share_a_job(make_queue: Any) -> None:
    q = make_queue()
    ids = {await submit(q) for _ in range(20)}

    async def drain(worker_id: str) -> list[str]:
        mine = make_queue()
        got: list[str] = []
        while claims := await mine.worker.claim(worker_id, MODEL, 3):
            for c in claims:
                assert await mine.worker.finish(c, [b"x"])
            got += [c.job_id for c in claims]
        return got

    a, b = await asyncio.gather(drain("wa"), drain("wb"))
    assert not set(a) & set(b) and set(a) | set(b) == ids and len(a) + len(b) == 20
