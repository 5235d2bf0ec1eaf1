"""The Redis data model: submit, claim, heartbeat, progress, finish, cancel, reclaim.

One stream per model read by the consumer group ``workers`` carries job ids; a hash per
job carries the state (layout in :mod:`service.queue.keys`). Every conditional state
change is one Lua script (:mod:`service.queue.scripts`), so a cancel, a reclaim and a
worker's final write can never interleave halfway.

Worker loop, in short (``wid = new_worker_id()``, unique per process start)::

    await q.heartbeat(info)              # first, then every heartbeat_interval_s
    claims = await q.reclaim(wid, model, free)          # dead workers' / handed-back jobs
    claims += await q.claim(wid, model, free - len(claims), block_ms=...)
    lost = await q.progress_many([(c, step, total, eta), ...])  # each step: drop `lost`
    await q.record_batch([rows, ...])                   # UNet rows per call (metrics)
    await q.finish(c, images) | q.fail(c, code, message) | q.release(c)  # release = drain
    await q.unregister(wid)              # on exit
    # now and then: await q.prune_consumers(model)

Memory stays bounded: an entry is XACKed *and* XDELeted when its job ends (so the
stream holds only live jobs), finished job records expire, and prune_consumers drops dead
workers' consumer records. No torch, no model imports here: the API process uses this
module too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from service.queue import scripts as lua
from service.queue.claims import StreamClaims
from service.queue.keys import (
    ANONYMOUS,
    BATCH_ROW_BOUNDS,
    LATENCY_BOUNDS,
    Claim,
    IdempotencyMismatch,
    JobRecord,
    Keys,
    OwnerQueueFull,
    QueueFull,
    RateLimited,
    SubmitResult,
    WorkerInfo,
    new_worker_id,
    text,
)
from service.ratelimit import burst_of
from service.settings import Settings

__all__ = [
    "Claim",
    "IdempotencyMismatch",
    "JobQueue",
    "JobRecord",
    "OwnerQueueFull",
    "QueueFull",
    "RateLimited",
    "SubmitResult",
    "WorkerInfo",
    "new_worker_id",
]

ProgressUpdate = tuple[Claim, int, int, float | None]


def _csv(bounds: Iterable[float]) -> str:
    return ",".join(repr(float(b)) for b in bounds)


class JobQueue(StreamClaims):
    """Async facade over the Redis data model, shared by the API and the workers."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._groups: set[str] = set()
        reg = redis.register_script
        self._submit = reg(lua.SUBMIT)
        self._activate = reg(lua.ACTIVATE)
        self._reclaim = reg(lua.RECLAIM)
        self._progress = reg(lua.PROGRESS)
        self._finish = reg(lua.FINISH)
        self._fail = reg(lua.FAIL)
        self._release = reg(lua.RELEASE)
        self._cancel = reg(lua.CANCEL)
        self._observe = reg(lua.OBSERVE)
        self._prune = reg(lua.PRUNE_CONSUMERS)

    @classmethod
    def connect(cls, settings: Settings) -> JobQueue:
        """A queue on a new connection pool with fail-fast timeouts (nothing connects yet).

        A dropped connection is retried twice with a short backoff, so API and workers ride
        through a Redis restart; while Redis is away calls raise ConnectionError at once.
        """
        url = settings.redis_url or "redis://127.0.0.1:6379/0"
        client = Redis.from_url(
            url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=min(settings.redis_timeout_s, 2.0),
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
            health_check_interval=30,
        )
        return cls(client, settings)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()

    # ------------------------------------------------------------------ client side

    async def submit(
        self,
        params: dict[str, Any],
        *,
        model: str,
        job_id: str,
        idempotency_key: str | None = None,
        digest: str = "",
        owner: str = ANONYMOUS,
        webhook_url: str | None = None,
    ) -> SubmitResult:
        """Create a job (hash + stream entry, atomically), or return the idempotent twin.

        Raises RateLimited past the owner's ``rate_limit_per_min``, OwnerQueueFull past
        ``max_queued_per_key`` unfinished jobs of ``owner``, QueueFull past ``max_queue``
        queued jobs for the model, and IdempotencyMismatch when the owner used the key with
        a different ``digest``. A job with ``webhook_url`` gets a delivery on its final state.
        """
        s = self.settings
        idem = self.keys.idem(idempotency_key, owner) if idempotency_key else ""
        kind, found, status, rank, params_json = await self._submit(
            args=[
                self._p,
                job_id,
                model,
                json.dumps(params, separators=(",", ":")),
                digest,
                repr(time.time()),
                s.max_queue,
                idem,
                self._job_ttl,
                owner,
                webhook_url or "",
                s.max_queued_per_key,
                repr(float(s.rate_limit_per_min)),
                burst_of(s.rate_limit_per_min, s.rate_limit_burst),
            ]
        )
        kind, found = text(kind), text(found) or ""
        if kind == "rate_limited":
            raise RateLimited(int(rank))
        if kind == "owner_full":
            raise OwnerQueueFull(f"this key has {s.max_queued_per_key} unfinished jobs")
        if kind == "full":
            raise QueueFull(f"queue for model {model!r} holds {self.settings.max_queue} jobs")
        if kind == "mismatch":
            raise IdempotencyMismatch(found)
        return SubmitResult(
            job_id=found,
            created=kind == "created",
            status=text(status) or "queued",
            queue_position=None if int(rank) < 0 else int(rank),
            params=json.loads(params_json),
        )

    async def get(self, job_id: str) -> JobRecord | None:
        """The job record with its queue position (None when unknown or expired)."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw or b"status" not in raw:
            return None
        decoded = {k.decode(): v.decode() for k, v in raw.items()}
        position = None
        if decoded["status"] == "queued":
            position = await self.redis.zrank(self.keys.queued(decoded["model"]), job_id)
        return JobRecord.from_hash(decoded, position)

    async def image(self, job_id: str, index: int) -> bytes | None:
        """Encoded bytes of one result image, None once expired."""
        return await self.redis.hget(self.keys.images(job_id), str(index))

    async def cancel(self, job_id: str, owner: str | None = None) -> str:
        """Cancel a queued or running job (of ``owner``, when given).

        Returns ``"canceled"`` when this call (or an earlier one) canceled it, ``"missing"``
        for an unknown id or another owner's job, else the terminal status it already had.
        A running job's worker sees it through :meth:`canceled` / a refused
        :meth:`progress` and drops it.
        """
        args = [self._p, job_id, repr(time.time()), self._job_ttl, owner or ""]
        result = await self._cancel(args=args)
        return text(result) or "missing"

    async def models(self) -> list[str]:
        """Every model that ever had a job queued (for metrics)."""
        return sorted({text(m) or "" for m in await self.redis.smembers(self.keys.models)})

    async def queue_depth(self, model: str) -> int:
        """Jobs queued (not yet running) for a model."""
        return int(await self.redis.zcard(self.keys.queued(model)))

    async def ping(self) -> bool:
        """Raise if Redis is unreachable (ConnectionError); True otherwise."""
        return bool(await self.redis.ping())

    # ------------------------------------------------------------------ workers: progress and outcome

    def _progress_args(self, c: Claim, step: int, total: int, eta_s: float | None) -> list[Any]:
        message = {"type": "progress", "id": c.job_id, "step": step, "total": total}
        message["eta_s"] = None if eta_s is None else round(eta_s, 3)
        eta = "" if eta_s is None else repr(float(eta_s))
        return [self._p, c.job_id, c.worker_id, c.lease, repr(time.time()), step, total, eta,
                json.dumps(message)]  # fmt: skip

    async def progress(self, claim: Claim, step: int, total: int, eta_s: float | None) -> bool:
        """Record and publish progress; False means the job is no longer this worker's
        (canceled or taken over): drop it before the next UNet step."""
        return bool(await self._progress(args=self._progress_args(claim, step, total, eta_s)))

    async def progress_many(self, updates: Sequence[ProgressUpdate]) -> set[str]:
        """Progress for a whole batch in one round trip; returns the ids to drop."""
        if not updates:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for claim, step, total, eta_s in updates:
                await self._progress(args=self._progress_args(claim, step, total, eta_s),
                                     client=pipe)  # fmt: skip
            results = await pipe.execute()
        return {u[0].job_id for u, ok in zip(updates, results, strict=True) if not ok}

    async def canceled(self, job_ids: Sequence[str]) -> set[str]:
        """Of ``job_ids``, those canceled (or gone): one round trip for a whole batch."""
        if not job_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.keys.job(job_id), "status")
            statuses = await pipe.execute()
        return {j for j, s in zip(job_ids, statuses, strict=True) if s in (None, b"canceled")}

    async def is_canceled(self, job_id: str) -> bool:
        """Whether one job was canceled (or is gone)."""
        return bool(await self.canceled([job_id]))

    async def finish(
        self, claim: Claim, images: Sequence[bytes], seeds: Sequence[int] | None = None
    ) -> bool:
        """Store the encoded images (TTL ``result_ttl_s``) and mark the job succeeded.

        ``seeds`` defaults to the noise convention's ``seed + i``. Refused (False, nothing
        written) unless ``claim`` is still the current lease.
        """
        if seeds is None:
            first = int(claim.params.get("seed", 0))
            seeds = [first + i for i in range(len(images))]
        fmt = str(claim.params.get("output_format", "png"))
        args = [self._p, claim.job_id, claim.worker_id, claim.lease, repr(time.time()),
                self.settings.result_ttl_s, self._job_ttl, json.dumps(list(seeds)),
                _csv(LATENCY_BOUNDS), fmt, *images]  # fmt: skip
        return bool(await self._finish(args=args))

    async def fail(self, claim: Claim, code: str, message: str) -> bool:
        """Mark the job failed for good (no retry); guarded like :meth:`finish`."""
        args = [self._p, claim.job_id, claim.worker_id, claim.lease, repr(time.time()),
                self._job_ttl, code, message]  # fmt: skip
        return bool(await self._fail(args=args))

    async def release(self, claim: Claim) -> bool:
        """Hand a running job back (drain timeout): queued again, next reclaim takes it,
        and this run does not count as an attempt."""
        args = [self._p, claim.job_id, claim.worker_id, claim.lease, repr(time.time())]
        return bool(await self._release(args=args))

    async def record_batch(self, rows: int | Sequence[int]) -> None:
        """Add UNet call sizes (rows per call) to ``ldmserve_unet_batch_rows``."""
        values = [rows] if isinstance(rows, int) else list(rows)
        if values:
            await self._observe(args=[self._p, "unet_batch_rows", _csv(BATCH_ROW_BOUNDS), *values])
