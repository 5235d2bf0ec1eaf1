"""Per-key submit rate limits and per-key caps on unfinished jobs, counted in Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.auth import hash_key
from service.ratelimit import burst_of, retry_after_s
from tests.apps import AppClientFactory
from tests.queues import Queues

pytestmark = pytest.mark.anyio
Client = httpx.AsyncClient
API_KEYS = f"alice:{hash_key('a-key')},bob:{hash_key('b-key')}"
AUTH = {"alice": {"Authorization": "Bearer a-key"}, "bob": {"Authorization": "Bearer b-key"}}


@pytest.fixture
def make_client(app_client_factory: AppClientFactory) -> AppClientFactory:
    async def make(**overrides: Any) -> tuple[Client, FastAPI]:
        return await app_client_factory(**{"api_keys": API_KEYS, **overrides})

    return make


async def submit(client: Client, who: str | None = "alice", **headers: str) -> httpx.Response:
    auth = AUTH[who] if who else {}
    return await client.post("/v1/jobs", json={"prompt": "a"}, headers=auth | headers)


def test_helpers() -> None:
    assert burst_of(60, None) == 60 and burst_of(0.5, None) == 1 and burst_of(60, 3) == 3
    assert retry_after_s(1) == 1 and retry_after_s(1000) == 1 and retry_after_s(1001) == 2
    assert retry_after_s(0) == 1


async def test_burst_then_429_with_the_exact_retry_after(make_client: Any) -> None:
    client, _ = await make_client(rate_limit_per_min=6, rate_limit_burst=2)  # one per 10 s
    assert [(await submit(client)).status_code for _ in range(2)] == [202, 202]
    r = await submit(client)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert r.headers["retry-after"] == "10"  # ceil(the ~9.99 s until the next one passes)
    # Another key has its own allowance.
    assert (await submit(client, "bob")).status_code == 202


async def test_the_allowance_refills(make_client: Any) -> None:
    client, _ = await make_client(rate_limit_per_min=600, rate_limit_burst=1)  # one per 0.1 s
    assert (await submit(client)).status_code == 202
    r = await submit(client)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    await asyncio.sleep(0.15)
    assert (await submit(client)).status_code == 202


async def test_the_limit_holds_across_api_replicas(make_client: Any) -> None:
    one, _ = await make_client(rate_limit_per_min=6, rate_limit_burst=3)
    two, _ = await make_client(rate_limit_per_min=6, rate_limit_burst=3)
    codes = [(await submit(c)).status_code for c in (one, two, one, two)]
    assert codes == [202, 202, 202, 429]


async def test_concurrent_submits_never_exceed_the_burst(make_client: Any) -> None:
    client, _ = await make_client(rate_limit_per_min=1, rate_limit_burst=5)
    codes = await asyncio.gather(*(submit(client) for _ in range(20)))
    assert sorted(r.status_code for r in codes) == [202] * 5 + [429] * 15


async def test_idempotent_replays_cost_nothing(make_client: Any) -> None:
    client, _ = await make_client(rate_limit_per_min=1, rate_limit_burst=1)
    first = await submit(client, **{"Idempotency-Key": "k1"})
    again = await submit(client, **{"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert (await submit(client)).status_code == 429


async def test_rate_limit_off(make_client: Any) -> None:
    client, _ = await make_client(rate_limit_per_min=0)
    codes = await asyncio.gather(*(submit(client) for _ in range(40)))
    assert {r.status_code for r in codes} == {202}


async def test_without_auth_everyone_shares_one_anonymous_bucket(make_client: Any) -> None:
    client, _ = await make_client(api_keys="", rate_limit_per_min=6, rate_limit_burst=2)
    assert [(await submit(client, None)).status_code for _ in range(3)] == [202, 202, 429]


async def test_per_key_cap_on_unfinished_jobs(make_client: Any) -> None:
    client, app = await make_client(
        max_queued_per_key=2, queue_full_retry_after_s=3, metrics_keys="bob"
    )
    assert [(await submit(client)).status_code for _ in range(2)] == [202, 202]
    r = await submit(client)
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "too_many_jobs"
    assert (await submit(client, "bob")).status_code == 202  # the cap is per key

    q = Queues.over(app.state.queue.store)
    (claim,) = await q.worker.claim("w1", "demo", 1)  # running still counts
    assert (await submit(client)).status_code == 429
    await q.worker.finish(claim, [b"png"])  # finished: a slot frees
    job = (await submit(client)).json()["id"]
    assert (await submit(client)).status_code == 429
    await client.delete(f"/v1/jobs/{job}", headers=AUTH["alice"])  # canceled: a slot frees
    assert (await submit(client)).status_code == 202

    # A job lost from Redis (eviction, manual cleanup) does not hold a slot forever.
    victim = await q.store.redis.srandmember(q.store.keys.owner_active("alice"))
    await q.store.redis.delete(q.store.keys.job(victim.decode()))
    assert (await submit(client)).status_code == 202

    text = (await client.get("/metrics", headers=AUTH["bob"])).text
    assert 'ldmserve_submits_refused_total{reason="too_many_jobs"} 3' in text.splitlines()


async def test_rate_limited_submits_are_counted(make_client: Any) -> None:
    client, _ = await make_client(rate_limit_per_min=1, rate_limit_burst=1, metrics_keys="alice")
    for _ in range(3):
        await submit(client)
    text = (await client.get("/metrics", headers=AUTH["alice"])).text
    assert 'ldmserve_submits_refused_total{reason="rate_limited"} 2' in text.splitlines()
