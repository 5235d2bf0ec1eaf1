"""The webhook dispatcher: an asyncio task in each API process (started by the lifespan).

Deliveries are queued by the queue's finalize step (:mod:`service.queue.lua`) in the
stream ``P:webhooks``, atomically with the job's final state, so a worker never waits on a
receiver. Every API replica reads that stream in the consumer group ``dispatchers``:

1. ``XREADGROUP`` takes new deliveries (at most :data:`CONCURRENCY` in flight here);
2. each is POSTed with httpx — the URL re-checked against the SSRF policy, the connection
   pinned to the checked address (``Host`` header and TLS SNI carry the name, the
   certificate is verified against it), no redirects, no proxies from the environment,
   ``webhook_timeout_s`` for the whole exchange, the response body never read;
3. a 2xx answer ends it (``XACK`` + ``XDEL``); otherwise the entry moves, in one script,
   to the zset ``P:webhooks:retry`` scored by its due time — ``webhook_backoff_s *
   2**(attempt-1)`` ±20% — and ``WEBHOOK_PROMOTE`` (:mod:`service.queue.webhook_scripts`) moves
   due ones back to the stream; after
   ``webhook_max_attempts`` attempts it is dropped and counted as failed;
4. ``XAUTOCLAIM`` takes over deliveries idle for ``webhook_claim_idle_s`` (their
   dispatcher died mid-delivery).

Delivery is at least once: a receiver deduplicates on the body's ``id`` + ``status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import httpx
from redis.exceptions import RedisError, ResponseError

from service.queue import webhook_scripts
from service.queue.keys import WEBHOOK_GROUP
from service.queue.records import new_worker_id
from service.queue.store import QueueStore
from service.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AllowList,
    Target,
    WebhookRefused,
    check_url,
    delivery_body,
    sign,
)

log = logging.getLogger(__name__)
CONCURRENCY = 16
POLL_S = 0.25


def _decode(fields: Mapping[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in fields.items()
    }


def _host_header(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


class WebhookDispatcher:
    """Delivers the queued webhooks of one deployment (run one per API process)."""

    def __init__(self, store: QueueStore) -> None:
        settings = store.settings
        if settings.webhook_secret is None:
            raise ValueError("webhooks need LDMSERVE_WEBHOOK_SECRET")
        self.store = store
        self.redis = store.redis
        self.settings = settings
        self.keys = store.keys
        self.secret = settings.webhook_secret.get_secret_value().encode()
        self.allow = AllowList.parse(settings.webhook_allow)
        self.consumer = "dispatcher-" + new_worker_id()
        self._client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            trust_env=False,  # an environment proxy would defeat the address pinning
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: set[str] = set()
        self._group_ready = False
        self._next_autoclaim = 0.0
        self._redis_down = False
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Deliver until :meth:`stop`; Redis outages are waited out.

        Redis commands are never cancelled mid-flight (redis-py can lose a connection's
        framing that way): the loop polls without blocking in Redis and waits on the stop
        event in between.
        """
        try:
            while not self._stop.is_set():
                pause = 0.0
                try:
                    if not await self.step():
                        pause = POLL_S
                    self._redis_down = False
                except (RedisError, OSError) as exc:
                    if not self._redis_down:
                        log.warning("webhook dispatcher: Redis unavailable: %s", exc)
                    self._redis_down = True
                    self._group_ready = False
                    pause = 1.0
                if pause:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), pause)
        finally:
            await self.aclose()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current round."""
        self._stop.set()

    async def aclose(self, grace_s: float | None = None) -> None:
        """Let deliveries in flight end (up to ``grace_s``), then cancel the rest: their
        entries stay pending and another dispatcher takes them over."""
        grace = self.settings.webhook_timeout_s if grace_s is None else grace_s
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await self._client.aclose()

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.keys.webhooks, WEBHOOK_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def step(self) -> int:
        """One round: promote due retries, take over stale ones, read new ones. Returns
        the number of deliveries started."""
        await self._ensure_group()
        await self.store.run(
            webhook_scripts.WEBHOOK_PROMOTE, now_ms=int(time.time() * 1000), limit=100
        )
        entries: list[tuple[str, dict[str, str] | None]] = []
        now = time.monotonic()
        if now >= self._next_autoclaim:
            self._next_autoclaim = now + self.settings.webhook_claim_idle_s / 2
            entries += await self._autoclaim()
        free = CONCURRENCY - len(self._tasks) - len(entries)
        if free > 0:
            try:
                reply = await self.redis.xreadgroup(
                    WEBHOOK_GROUP, self.consumer, {self.keys.webhooks: ">"}, count=free
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False
                return 0
            for _stream, rows in reply or []:
                entries += [(_decode({"id": eid})["id"], f and _decode(f)) for eid, f in rows]
        started = 0
        for entry_id, fields in entries:
            if entry_id in self._in_flight:
                continue
            self._in_flight.add(entry_id)
            task = asyncio.create_task(self._handle(entry_id, fields))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started

    async def _autoclaim(self) -> list[tuple[str, dict[str, str] | None]]:
        idle_ms = int(self.settings.webhook_claim_idle_s * 1000)
        reply = await self.redis.xautoclaim(
            self.keys.webhooks, WEBHOOK_GROUP, self.consumer, idle_ms, start_id="0-0", count=50
        )
        rows = reply[1] if reply and len(reply) > 1 else []
        return [(_decode({"id": eid})["id"], f and _decode(f)) for eid, f in rows]

    async def _finish(self, entry_id: str, counter: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.webhooks, WEBHOOK_GROUP, entry_id)
            pipe.xdel(self.keys.webhooks, entry_id)
            pipe.hincrby(self.keys.metrics, counter, 1)
            await pipe.execute()

    async def _handle(self, entry_id: str, fields: dict[str, str] | None) -> None:
        try:
            if not fields or "job" not in fields:
                await self._finish(entry_id, "webhooks_failed")
                return
            attempt = int(fields.get("attempt") or 1)
            if await self.deliver(fields):
                await self._finish(entry_id, "webhooks_delivered")
            elif attempt >= self.settings.webhook_max_attempts:
                log.warning("webhook for job %s failed after %d attempt(s); dropped",
                            fields["job"], attempt)  # fmt: skip
                await self._finish(entry_id, "webhooks_failed")
            else:
                delay = self.settings.webhook_backoff_s * 2 ** (attempt - 1)
                delay *= random.uniform(0.8, 1.2)
                due_ms = int((time.time() + delay) * 1000)
                member = json.dumps({**fields, "attempt": str(attempt + 1)}, sort_keys=True)
                await self.store.run(
                    webhook_scripts.WEBHOOK_RETRY, entry_id=entry_id, due_ms=due_ms, member=member
                )
        except RedisError as exc:  # the entry stays pending; XAUTOCLAIM retries it later
            log.warning("webhook entry %s: Redis error: %s", entry_id, exc)
        finally:
            self._in_flight.discard(entry_id)

    async def deliver(self, fields: Mapping[str, str]) -> bool:
        """One attempt: re-check the URL, POST the signed body to the checked address."""
        job_id, attempt = fields["job"], fields.get("attempt", "1")
        timeout = self.settings.webhook_timeout_s
        try:
            target = await check_url(fields.get("url", ""), self.allow, timeout)
        except WebhookRefused as exc:
            log.warning("webhook for job %s refused at delivery: %s", job_id, exc)
            return False
        body = delivery_body(fields)
        timestamp = str(int(time.time()))
        headers = {
            "Host": _host_header(target),
            "Content-Type": "application/json",
            "User-Agent": "ldmserve-webhook/1",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
            "X-Ldmserve-Job": job_id,
            "X-Ldmserve-Delivery-Attempt": attempt,
        }
        url = httpx.URL(target.url).copy_with(host=str(target.address))
        extensions: dict[str, Any] = {}
        if target.scheme == "https" and not target.host_is_ip:
            extensions["sni_hostname"] = target.host
        started = time.perf_counter()
        try:
            status = await asyncio.wait_for(self._post(url, body, headers, extensions), timeout)
        except (httpx.HTTPError, asyncio.TimeoutError, OSError) as exc:
            log.info("webhook for job %s attempt %s: %s", job_id, attempt, type(exc).__name__)
            return False
        elapsed_ms = (time.perf_counter() - started) * 1000
        log.info("webhook for job %s attempt %s: HTTP %d in %.0f ms", job_id, attempt, status,
                 elapsed_ms)  # fmt: skip
        return 200 <= status < 300

    async def _post(
        self, url: httpx.URL, body: bytes, headers: dict[str, str], extensions: dict[str, Any]
    ) -> int:
        """POST and return the status; the response body is never read."""
        async with self._client.stream(
            "POST", url, content=body, headers=headers, extensions=extensions
        ) as response:
            return response.status_code
