"""The API's side of the queue: submit, read, cancel, and the registry / metrics reads.

Writes here are the caller-facing ones (a new job, a cancel); everything a worker writes is
in :mod:`service.queue.worker_side`. No torch, no model imports: the API process uses it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from service.queue import request_scripts
from service.queue.errors import IdempotencyMismatch, OwnerQueueFull, QueueFull, RateLimited
from service.queue.keys import ANONYMOUS, PRIORITIES
from service.queue.records import JobRecord, SubmitResult, WorkerInfo, text
from service.queue.store import QueueStore
from service.ratelimit import burst_of
from service.results.base import input_name
from service.settings import Settings


class ApiQueue:
    """Submit / get / cancel jobs and read the worker registry, over one :class:`QueueStore`."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store

    @classmethod
    def connect(cls, settings: Settings) -> ApiQueue:
        """An API side on its own connection pool (:meth:`QueueStore.connect`)."""
        return cls(QueueStore.connect(settings))

    async def aclose(self) -> None:
        """Close the store's connection pool."""
        await self.store.aclose()

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
        inputs: dict[str, bytes] | None = None,
    ) -> SubmitResult:
        """Create a job (hash + stream entry, atomically), or return the idempotent twin.

        Raises RateLimited past the owner's ``rate_limit_per_min``, OwnerQueueFull past
        ``max_queued_per_key`` unfinished jobs of ``owner``, QueueFull past ``max_queue``
        queued jobs for the model, and IdempotencyMismatch when the owner used the key with
        a different ``digest``. A job with ``webhook_url`` gets a delivery on its final state.
        Its priority is ``params["priority"]`` (JobRequest's transport field; default
        ``normal``): workers take higher priorities first, and queue positions count them.
        ``inputs`` (img2img / inpainting images) are stored before the job is queued, so a
        worker never claims a job whose images are missing: in the result store when there is
        one (Redis keeps their names, as ``ref:<field>``), else in Redis; they expire with
        the job (and after ``input_ttl_s`` if the job never ends).
        """
        priority = str(params.get("priority", "normal"))
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
        redis, key, results = self.store.redis, self.store.keys.inputs(job_id), self.store.results
        names = [input_name(job_id, field) for field in inputs or {}]
        if inputs:
            if results is None:
                await redis.hset(key, mapping=inputs)  # type: ignore[arg-type]
            else:
                pairs = zip(names, inputs.values(), strict=True)
                await asyncio.gather(*(results.put(n, d, "image/png") for n, d in pairs))
                refs = {f"ref:{field}": n for field, n in zip(inputs, names, strict=True)}
                await redis.hset(key, mapping=refs)  # type: ignore[arg-type]
            await redis.expire(key, self.store.settings.input_ttl_s)
        created = False
        try:
            result = await self._submit_script(
                params, priority, model, job_id, idempotency_key, digest, owner, webhook_url
            )
            created = result.created
        finally:
            if inputs and not created:  # refused, or an idempotent replay (the first job
                await redis.delete(key)  # has its own inputs)
                if results is not None:
                    await results.delete(names)
        return result

    async def _submit_script(
        self,
        params: dict[str, Any],
        priority: str,
        model: str,
        job_id: str,
        idempotency_key: str | None,
        digest: str,
        owner: str,
        webhook_url: str | None,
    ) -> SubmitResult:
        st, s = self.store, self.store.settings
        kind, found, status, rank, params_json = await st.run(
            request_scripts.SUBMIT,
            job_id=job_id,
            model=model,
            priority=priority,
            params_json=json.dumps(params, separators=(",", ":")),
            digest=digest,
            now=repr(time.time()),
            max_queue=s.max_queue,
            idem_key=st.keys.idem(idempotency_key, owner) if idempotency_key else "",
            idem_ttl=st.job_ttl,
            owner=owner,
            webhook=webhook_url or "",
            max_per_owner=s.max_queued_per_key,
            rate_per_min=repr(float(s.rate_limit_per_min)),
            burst=burst_of(s.rate_limit_per_min, s.rate_limit_burst),
        )
        kind, found = text(kind), text(found) or ""
        if kind == "rate_limited":
            raise RateLimited(int(rank))
        if kind == "owner_full":
            raise OwnerQueueFull(f"this key has {s.max_queued_per_key} unfinished jobs")
        if kind == "full":
            raise QueueFull(f"queue for model {model!r} holds {s.max_queue} jobs")
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
        redis, keys = self.store.redis, self.store.keys
        raw = await redis.hgetall(keys.job(job_id))
        if not raw or b"status" not in raw:
            return None
        decoded = {k.decode(): v.decode() for k, v in raw.items()}
        position = None
        if decoded["status"] == "queued":
            position = await redis.zrank(keys.queued(decoded["model"]), job_id)
        return JobRecord.from_hash(decoded, position)

    async def preview(self, job_id: str) -> dict[str, Any] | None:
        """The running job's latest live preview (the SSE ``preview`` payload), if any."""
        raw = await self.store.redis.get(self.store.keys.preview(job_id))
        return None if raw is None else json.loads(raw)

    async def image(self, job_id: str, index: int) -> bytes | None:
        """Encoded bytes of one result image, None once expired."""
        name = await self._result_name(job_id, index)
        if name is None:
            return await self.store.redis.hget(self.store.keys.images(job_id), str(index))
        if not name or self.store.results is None:
            return None
        return await self.store.results.get(name)

    async def image_url(self, job_id: str, index: int) -> str | None:
        """A presigned URL for one result image when ``result_redirect`` is on and the store
        makes them (else None: serve :meth:`image`'s bytes)."""
        results, s = self.store.results, self.store.settings
        if results is None or not s.result_redirect:
            return None
        name = await self._result_name(job_id, index)
        if not name:
            return None
        expires_at = await self.store.redis.hget(self.store.keys.job(job_id), "expires_at")
        ttl = int(float(expires_at or 0) - time.time())
        return results.presigned_url(name, ttl) if ttl > 0 else None

    async def _result_name(self, job_id: str, index: int) -> str | None:
        """The object name of image ``index`` in the result store; None when the job keeps
        its images in Redis, "" when they expired (or there is no such image)."""
        refs, expires_at = await self.store.redis.hmget(
            self.store.keys.job(job_id), "results", "expires_at"
        )
        if refs is None:
            return None
        names = json.loads(refs)
        if float(expires_at or 0) <= time.time() or not 0 <= index < len(names):
            return ""
        return str(names[index])

    async def cancel(self, job_id: str, owner: str | None = None) -> str:
        """Cancel a queued or running job (of ``owner``, when given).

        Returns ``"canceled"`` when this call (or an earlier one) canceled it, ``"missing"``
        for an unknown id or another owner's job, else the terminal status it already had.
        A running job's worker sees it through a refused progress write and drops it.
        """
        result = await self.store.run(
            request_scripts.CANCEL,
            job_id=job_id,
            now=repr(time.time()),
            job_ttl=self.store.job_ttl,
            owner=owner or "",
        )
        return text(result) or "missing"

    async def models(self) -> list[str]:
        """Every model that ever had a job queued (for metrics)."""
        members = await self.store.redis.smembers(self.store.keys.models)
        return sorted({text(m) or "" for m in members})

    async def queue_depth(self, model: str) -> int:
        """Jobs queued (not yet running) for a model."""
        return int(await self.store.redis.zcard(self.store.keys.queued(model)))

    async def ping(self) -> bool:
        """Raise if Redis is unreachable (ConnectionError); True otherwise."""
        return bool(await self.store.redis.ping())

    async def capabilities(self, model: str) -> dict[str, Any] | None:
        """What the model's workers last published (None: no worker ever registered it)."""
        raw = await self.store.redis.get(self.store.keys.capabilities(model))
        return None if raw is None else json.loads(raw)

    async def live_workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat key has not expired (stale registry entries are pruned)."""
        redis, keys = self.store.redis, self.store.keys
        ids = [text(w) or "" for w in await redis.zrange(keys.workers, 0, -1)]
        if not ids:
            return []
        values = await redis.mget([keys.worker(w) for w in ids])
        dead = [w for w, v in zip(ids, values, strict=True) if v is None]
        if dead:
            await redis.zrem(keys.workers, *dead)
        return [WorkerInfo.from_json(v) for v in values if v is not None]
