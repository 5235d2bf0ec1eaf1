"""Webhooks end to end: refusal at submit, signed delivery, retries, pinning, takeover.

The URL policy and signatures alone are tested in test_webhook_policy.py.

Network rule: every request goes to a receiver on 127.0.0.1 started here; public
addresses appear only as IP literals that are checked, never contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.exceptions import ResponseError

import service.webhooks as webhooks
from service.queue import QueueStore
from service.settings import Settings
from service.webhook_dispatch import WebhookDispatcher
from service.webhooks import (
    delivery_body,
    verify_signature,
)
from tests.apps import AppClientFactory
from tests.queues import Queues

pytestmark = pytest.mark.anyio
Client = httpx.AsyncClient
SECRET = "whsec-test"


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records requests and fails the first N."""

    fail_first: int = 0
    status: int = 204
    headers_out: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, _, body in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            state.requests.append((self.path, dict(self.headers.items()), body))
            failing = len(state.requests) <= state.fail_first
            self.send_response(500 if failing else state.status)
            for name, value in state.headers_out.items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def make_client(app_client_factory: AppClientFactory) -> AppClientFactory:
    async def make(**overrides: Any) -> tuple[Client, FastAPI]:
        base = {"webhook_secret": SECRET, "webhook_backoff_s": 0.05,
                "webhook_allow": "127.0.0.1/32", "webhook_timeout_s": 2.0}  # fmt: skip
        return await app_client_factory(**{**base, **overrides})

    return make


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ at submit


@pytest.mark.parametrize("url", ["http://127.0.0.1/", "http://169.254.169.254/", "file:///x",
                                 "http://[::1]/", "http://localhost/", "http://10.0.0.1/"])  # fmt: skip
async def test_submit_refuses_bad_webhook_urls(make_client: Any, url: str) -> None:
    client, _ = await make_client(webhook_allow="")
    r = await client.post("/v1/jobs", json={"prompt": "a", "webhook_url": url})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "webhook_url"
    assert r.json()["error"]["code"] == "webhook_refused"


async def test_submit_without_a_secret_refuses_webhooks(make_client: Any) -> None:
    client, _ = await make_client(webhook_secret=None)
    r = await client.post("/v1/jobs", json={"prompt": "a", "webhook_url": "http://93.184.216.34/"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "webhooks_disabled"
    r = await client.post("/v1/jobs", json={"prompt": "a", "webhook_url": 5})
    assert r.status_code == 422 and r.json()["error"]["field"] == "webhook_url"


async def test_public_url_is_accepted_and_kept_out_of_parameters(make_client: Any) -> None:
    client, app = await make_client()
    r = await client.post("/v1/jobs", json={"prompt": "a", "webhook_url": "http://93.184.216.34/"})
    assert r.status_code == 202
    view = (await client.get(f"/v1/jobs/{r.json()['id']}")).json()
    assert "webhook_url" not in view["parameters"]
    record = await app.state.queue.get(r.json()["id"])
    assert record.webhook_url == "http://93.184.216.34/"


# ------------------------------------------------------------------ delivery


async def test_success_is_delivered_signed_after_retries(
    make_client: Any, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    client, app = await make_client()
    job = (await client.post("/v1/jobs", json={"prompt": "a", "num_images": 2,
                                               "webhook_url": receiver.url})).json()["id"]  # fmt: skip
    q = Queues.over(app.state.queue.store)
    (claim,) = await q.worker.claim("w1", "demo", 1)
    await q.worker.finish(claim, [b"a", b"b"])
    await wait_for(lambda: len(receiver.requests) >= 3)
    for (path, headers, body), attempt in zip(receiver.requests, ("1", "2", "3"), strict=True):
        assert path == "/hook" and verify_signature(SECRET.encode(), headers, body)
        assert headers["X-Ldmserve-Delivery-Attempt"] == attempt
        assert headers["Host"] == f"127.0.0.1:{receiver.port}"
        assert headers["Content-Type"] == "application/json"
    body = receiver.bodies()[-1]
    assert body["id"] == job and body["status"] == "succeeded" and body["type"] == "job.succeeded"
    assert body["images"] == [f"/v1/jobs/{job}/images/0", f"/v1/jobs/{job}/images/1"]
    assert body["error"] is None
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 3  # done: nothing more
    text = (await client.get("/metrics")).text.splitlines()
    assert 'ldmserve_webhook_deliveries_total{outcome="delivered"} 1' in text
    assert "ldmserve_webhook_retries_total 2" in text and "ldmserve_webhooks_pending 0" in text


async def test_failure_and_cancel_are_delivered(make_client: Any, receiver: Receiver) -> None:
    client, app = await make_client()
    body = {"prompt": "a", "webhook_url": receiver.url}
    failed = (await client.post("/v1/jobs", json=body)).json()["id"]
    canceled = (await client.post("/v1/jobs", json=body)).json()["id"]
    plain = (await client.post("/v1/jobs", json={"prompt": "a"})).json()["id"]
    q = Queues.over(app.state.queue.store)
    (claim,) = await q.worker.claim("w1", "demo", 1)
    await q.worker.fail(claim, "generation_failed", "CUDA out of memory")
    await client.delete(f"/v1/jobs/{canceled}")
    await client.delete(f"/v1/jobs/{plain}")
    await wait_for(lambda: len(receiver.requests) >= 2)
    await asyncio.sleep(0.2)
    bodies = {b["id"]: b for b in receiver.bodies()}
    assert set(bodies) == {failed, canceled}
    assert bodies[failed]["error"] == {"code": "generation_failed", "message": "CUDA out of memory"}
    assert bodies[canceled]["status"] == "canceled" and bodies[canceled]["images"] == []


async def test_attempts_are_bounded(make_client: Any, receiver: Receiver) -> None:
    receiver.fail_first = 100
    client, app = await make_client(webhook_max_attempts=3)
    await client.post("/v1/jobs", json={"prompt": "a", "webhook_url": receiver.url})
    (claim,) = await Queues.over(app.state.queue.store).worker.claim("w1", "demo", 1)
    await Queues.over(app.state.queue.store).worker.finish(claim, [b"a"])
    await wait_for(lambda: len(receiver.requests) >= 3)
    await asyncio.sleep(0.5)
    assert len(receiver.requests) == 3
    text = (await client.get("/metrics")).text.splitlines()
    assert 'ldmserve_webhook_deliveries_total{outcome="failed"} 1' in text


async def test_redirects_are_not_followed(make_client: Any, receiver: Receiver) -> None:
    receiver.status = 302
    receiver.headers_out = {"Location": "http://169.254.169.254/latest/meta-data/"}
    client, app = await make_client(webhook_max_attempts=1)
    await client.post("/v1/jobs", json={"prompt": "a", "webhook_url": receiver.url})
    (claim,) = await Queues.over(app.state.queue.store).worker.claim("w1", "demo", 1)
    await Queues.over(app.state.queue.store).worker.finish(claim, [b"a"])
    await wait_for(lambda: len(receiver.requests) >= 1)
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 1
    text = (await client.get("/metrics")).text.splitlines()
    assert 'ldmserve_webhook_deliveries_total{outcome="failed"} 1' in text


def _fields(url: str, job: str = "f" * 32) -> dict[str, str]:
    return {"job": job, "status": "succeeded", "url": url, "attempt": "1", "images": "1",
            "error_code": "", "error": "", "finished_at": str(time.time())}  # fmt: skip


async def test_delivery_rechecks_the_policy(redis_url: str, receiver: Receiver) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    dispatcher = WebhookDispatcher(
        QueueStore(redis, Settings(webhook_secret=SECRET))
    )  # no allow-list
    try:
        assert not await dispatcher.deliver(_fields(receiver.url))
        assert receiver.requests == []
    finally:
        await dispatcher.aclose()
        await redis.aclose()


async def test_delivery_connects_to_the_checked_address(
    redis_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is resolved once, checked, and the connection goes to that address (the
    name itself resolves nowhere): a second DNS answer cannot redirect the request."""
    from redis.asyncio import Redis

    lookups: list[str] = []

    async def fake_resolve(host: str, port: int, timeout_s: float) -> list[Any]:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(webhooks, "resolve", fake_resolve)
    redis = Redis.from_url(redis_url)
    settings = Settings(webhook_secret=SECRET, webhook_allow="127.0.0.1/32")
    dispatcher = WebhookDispatcher(QueueStore(redis, settings))
    try:
        fields = _fields(f"http://hooks.example.invalid:{receiver.port}/hook")
        assert await dispatcher.deliver(fields)
        assert lookups == ["hooks.example.invalid"]
        (_path, headers, body) = receiver.requests[0]
        assert headers["Host"] == f"hooks.example.invalid:{receiver.port}"
        assert json.loads(body) == json.loads(delivery_body(fields))
    finally:
        await dispatcher.aclose()
        await redis.aclose()


async def test_a_dead_dispatchers_delivery_is_taken_over(
    make_client: Any, receiver: Receiver
) -> None:
    _, app = await make_client(webhook_timeout_s=0.2, webhook_claim_idle_s=0.5)
    q = Queues.over(app.state.queue.store)
    stream = q.store.keys.webhooks
    # A dispatcher that read the entry and died before delivering it.
    with contextlib.suppress(ResponseError):  # BUSYGROUP: the live dispatcher made it
        await q.store.redis.xgroup_create(stream, "dispatchers", id="0", mkstream=True)
    await q.store.redis.xadd(stream, _fields(receiver.url, "e" * 32))
    await q.store.redis.xreadgroup("dispatchers", "dead-one", {stream: ">"}, count=10)
    await wait_for(lambda: len(receiver.requests) >= 1, timeout_s=10)
    assert receiver.bodies()[0]["id"] == "e" * 32
    await asyncio.sleep(0.2)
    assert await q.store.redis.xlen(stream) == 0 and len(receiver.requests) == 1


async def test_two_replicas_share_deliveries_without_duplicates(
    make_client: Any, receiver: Receiver
) -> None:
    client, app = await make_client()
    await make_client()  # a second API replica, same Redis: a second dispatcher
    ids = [
        (await client.post("/v1/jobs", json={"prompt": "a", "webhook_url": receiver.url})).json()[
            "id"
        ]
        for _ in range(10)
    ]
    q = Queues.over(app.state.queue.store)
    for claim in await q.worker.claim("w1", "demo", 10):
        await q.worker.finish(claim, [b"a"])
    await wait_for(lambda: len(receiver.requests) >= 10)
    await asyncio.sleep(0.3)
    assert sorted(b["id"] for b in receiver.bodies()) == sorted(ids)


async def test_every_final_transition_queues_exactly_one_delivery(redis_url: str) -> None:
    """finalize queues the delivery atomically with the final state, the reclaim give-up
    included; a refused (stale) finish queues nothing."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    q = Queues.on(redis, Settings(max_attempts=1, reclaim_after_s=0, worker_ttl_s=0.3,
                                 heartbeat_interval_s=0.1))  # fmt: skip
    try:
        hook = "http://93.184.216.34/hook"
        job = (
            await q.api.submit({"seed": 1}, model="demo", job_id="a" * 32, webhook_url=hook)
        ).job_id
        await q.api.submit({"seed": 1}, model="demo", job_id="b" * 32)  # no webhook
        (stale, _plain) = await q.worker.claim("dead-worker", "demo", 2)  # never heart-beats
        (gave_up,) = [c for c in await q.worker.reclaim("w2", "demo", 2) if c.job_id == job] or [
            None
        ]
        assert gave_up is None  # max_attempts=1: the job failed instead of running again
        assert (await q.api.get(job)).status == "failed"
        assert not await q.worker.finish(stale, [b"late"])  # stale lease: refused, nothing queued
        entries = await redis.xrange(q.store.keys.webhooks)
        assert len(entries) == 1
        fields = {k.decode(): v.decode() for k, v in entries[0][1].items()}
        assert fields["job"] == job and fields["status"] == "failed" and fields["url"] == hook
        assert fields["error_code"] == "max_attempts" and fields["attempt"] == "1"
    finally:
        await redis.aclose()
