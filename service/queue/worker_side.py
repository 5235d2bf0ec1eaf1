"""The worker's side of the queue: registry, claim, reclaim, progress, finish, fail, release.

Three streams per model (one per priority), read by the consumer group ``workers``, carry
job ids; a worker reads them highest priority first. Claiming moves entries into this
worker's pending list and the job hashes to ``running`` in one script (``ACTIVATE``);
reclaiming takes over only entries of workers whose heartbeat expired (``RECLAIM``), and
entries parked for later (handed back on drain, or deferred because their owner already
runs ``max_running_per_key`` jobs). Every write after a claim is guarded by the lease.

Worker loop, in short (``wid = new_worker_id()``, unique per process start)::

    await q.heartbeat(info)              # first, then every heartbeat_interval_s
    claims = await q.reclaim(wid, model, free)          # dead workers' / handed-back jobs
    claims += await q.claim(wid, model, free - len(claims), block_ms=...)
    lost = await q.progress_many([(c, step, total, eta), ...])  # each step: drop `lost`
    await q.record_batch([rows, ...])                   # UNet rows per call (metrics)
    await q.finish(c, images) | q.fail(c, code, message) | q.release(c)  # release = drain
    await q.unregister(wid)              # on exit
    # now and then: await q.prune_consumers(model)

Memory stays bounded: an entry is XACKed *and* XDELeted when its job ends (so the stream
holds only live jobs), finished job records expire, and prune_consumers drops dead workers'
consumer records.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from service.queue import claim_scripts, outcome_scripts, run_scripts
from service.queue.keys import BATCH_ROW_BOUNDS, GROUP, LATENCY_BOUNDS, PRIORITIES
from service.queue.records import Claim, WorkerInfo, text
from service.queue.store import QueueStore
from service.results.base import CONTENT_TYPES, object_name
from service.settings import Settings

ProgressUpdate = tuple[Claim, int, int, float | None]
T = TypeVar("T")


def _csv(bounds: Iterable[float]) -> str:
    return ",".join(repr(float(b)) for b in bounds)


class WorkerQueue:
    """What a worker process does to the queue, over one :class:`QueueStore`."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self._groups: set[str] = set()

    @classmethod
    def connect(cls, settings: Settings) -> WorkerQueue:
        """A worker side on its own connection pool (:meth:`QueueStore.connect`)."""
        return cls(QueueStore.connect(settings))

    async def aclose(self) -> None:
        """Close the store's connection pool."""
        await self.store.aclose()

    # ------------------------------------------------------------------ registry

    async def heartbeat(self, info: WorkerInfo) -> None:
        """Announce a live worker for ``worker_ttl_s``; its claims are safe while it beats."""
        keys = self.store.keys
        ttl_ms = int(self.store.settings.worker_ttl_s * 1000)
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.worker(info.worker_id), info.to_json(), px=ttl_ms)
            pipe.zadd(keys.workers, {info.worker_id: time.time()})
            if info.capabilities is not None:
                caps = json.dumps(info.capabilities, separators=(",", ":"))
                pipe.set(keys.capabilities(info.model), caps)
            await pipe.execute()

    async def inputs(self, job_id: str) -> dict[str, bytes]:
        """A job's stored input images by field name (empty for text-to-image jobs); an
        image the result store no longer has is left out (the worker then fails the job)."""
        raw = await self.store.redis.hgetall(self.store.keys.inputs(job_id))
        found: dict[str, bytes] = {}
        for k, v in raw.items():
            field = text(k) or ""
            if not field.startswith("ref:"):
                found[field] = bytes(v)
            elif self.store.results is not None:
                data = await self.store.results.get(text(v) or "")
                if data is not None:
                    found[field.removeprefix("ref:")] = data
        return found

    async def drop_inputs(self, job_id: str) -> None:
        """Delete a finished job's input images from the result store (Redis expires its
        own copy with the job); objects of jobs that end elsewhere are swept by age."""
        if self.store.results is None:
            return
        raw = await self.store.redis.hgetall(self.store.keys.inputs(job_id))
        names = [text(v) or "" for k, v in raw.items() if (text(k) or "").startswith("ref:")]
        if names:
            await self.store.results.delete(names)

    async def unregister(self, worker_id: str) -> None:
        """Drop a worker's heartbeat now (after draining) so its leftovers are reclaimable."""
        keys = self.store.keys
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.worker(worker_id))
            pipe.zrem(keys.workers, worker_id)
            await pipe.execute()

    # ------------------------------------------------------------------ consumer group

    async def ensure_group(self, model: str) -> None:
        """Create the model's streams and their consumer group (from the start: no entry
        skipped)."""
        for stream in self.store.keys.streams(model):
            try:
                await self.store.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups.add(model)

    async def _with_group(self, model: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call()``; recreate the group once if Redis lost it (flush, new instance)."""
        if model not in self._groups:
            await self.ensure_group(model)
        try:
            return await call()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group(model)
            return await call()

    async def prune_consumers(self, model: str) -> int:
        """Forget consumers of dead workers that hold no entries (bounded group metadata).

        Call it now and then from a worker; workers restart with new ids, and each id
        otherwise stays a consumer of the group forever.
        """
        removed = await self._with_group(
            model, lambda: self.store.run(claim_scripts.PRUNE_CONSUMERS, model=model)
        )
        return int(removed)

    # ------------------------------------------------------------------ taking jobs

    def _claims(self, worker_id: str, model: str, rows: Sequence[Sequence[Any]]) -> list[Claim]:
        return [
            Claim(
                job_id=text(r[0]) or "",
                worker_id=worker_id,
                lease=int(r[1]),
                attempt=int(r[2]),
                params=json.loads(r[3]),
                entry_id=text(r[4]) or "",
                model=model,
            )
            for r in rows
        ]

    async def claim(
        self, worker_id: str, model: str, count: int, block_ms: int | None = None
    ) -> list[Claim]:
        """Take up to ``count`` new jobs (the worker's free batch capacity), higher
        priorities first.

        ``block_ms`` > 0 waits that long for new entries (when no stream has one) on a
        pooled connection of its own; keep it below ``redis_timeout_s`` (the socket
        timeout) or the wait times out. A wake-up takes at most one entry per stream.
        Entries whose job was canceled meanwhile are acked and skipped, and those whose
        owner is at ``max_running_per_key`` are parked, so fewer than ``count`` may come back.
        """
        if count <= 0:
            return []
        keys, redis = self.store.keys, self.store.redis
        priority_of = {keys.stream(model, p).encode(): p for p in PRIORITIES}
        entries: list[str] = []

        def collect(response: Any) -> None:
            for name, items in response or []:
                for entry_id, fields in items:
                    job = text(fields.get(b"job")) or ""
                    entries.extend([priority_of[name], text(entry_id) or "", job])

        for priority in PRIORITIES:
            left = count - len(entries) // 3
            if left <= 0:
                break
            stream = keys.stream(model, priority)
            collect(await self._with_group(
                model, lambda s=stream, n=left: redis.xreadgroup(GROUP, worker_id, {s: ">"}, count=n)
            ))  # fmt: skip
        if not entries and block_ms:
            every = {s: ">" for s in keys.streams(model)}
            collect(await self._with_group(
                model, lambda: redis.xreadgroup(GROUP, worker_id, every, count=1, block=block_ms)
            ))  # fmt: skip
        if not entries:
            return []
        rows = await self.store.run(
            claim_scripts.ACTIVATE,
            worker=worker_id,
            now=repr(time.time()),
            model=model,
            max_running=self.store.settings.max_running_per_key,
            rest=entries,
        )
        return self._claims(worker_id, model, rows)

    async def reclaim(self, worker_id: str, model: str, count: int) -> list[Claim]:
        """Take over up to ``count`` jobs whose worker stopped heart-beating.

        Only entries idle for ``reclaim_after_s`` *and* owned by a worker without a live
        heartbeat (or handed back with :meth:`release`) move; a slow but beating worker
        keeps its jobs. A job already run ``max_attempts`` times fails instead. (XPENDING
        with IDLE + XCLAIM rather than XAUTOCLAIM, because XAUTOCLAIM cannot skip entries
        of live owners.)
        """
        if count <= 0:
            return []
        s = self.store.settings

        async def run() -> Any:
            return await self.store.run(
                claim_scripts.RECLAIM,
                worker=worker_id,
                now=repr(time.time()),
                model=model,
                min_idle_ms=int(s.reclaim_after_s * 1000),
                count=count,
                max_attempts=s.max_attempts,
                job_ttl=self.store.job_ttl,
                scan_limit=max(1000, 10 * count),
                max_running=s.max_running_per_key,
            )

        rows = await self._with_group(model, run)
        return self._claims(worker_id, model, rows)

    # ------------------------------------------------------------------ progress and outcome

    def _progress_args(
        self, c: Claim, step: int, total: int, eta_s: float | None
    ) -> dict[str, Any]:
        message = {"type": "progress", "id": c.job_id, "step": step, "total": total}
        message["eta_s"] = None if eta_s is None else round(eta_s, 3)
        return {
            "job_id": c.job_id,
            "worker": c.worker_id,
            "lease": c.lease,
            "now": repr(time.time()),
            "step": step,
            "total": total,
            "eta": "" if eta_s is None else repr(float(eta_s)),
            "message": json.dumps(message),
        }

    async def progress(self, claim: Claim, step: int, total: int, eta_s: float | None) -> bool:
        """Record and publish progress; False means the job is no longer this worker's
        (canceled or taken over): drop it before the next UNet step."""
        args = self._progress_args(claim, step, total, eta_s)
        return bool(await self.store.run(run_scripts.PROGRESS, **args))

    async def progress_many(self, updates: Sequence[ProgressUpdate]) -> set[str]:
        """Progress for a whole batch in one round trip; returns the ids to drop."""
        if not updates:
            return set()
        calls = [self._progress_args(c, step, total, eta) for c, step, total, eta in updates]
        if self.store.settings.redis_cluster:  # cluster pipelines refuse EVALSHA
            results = await asyncio.gather(
                *(self.store.run(run_scripts.PROGRESS, **a) for a in calls)
            )
        else:
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for args in calls:
                    await self.store.run(run_scripts.PROGRESS, pipe=pipe, **args)
                results = await pipe.execute()
        return {u[0].job_id for u, ok in zip(updates, results, strict=True) if not ok}

    async def previews(self, items: Sequence[tuple[Claim, dict[str, Any]]]) -> None:
        """Publish and keep each job's latest live preview (one round trip for a batch).

        ``message`` is the SSE ``preview`` payload; a job no longer this worker's is skipped
        by the script (its loss is noticed by the progress write)."""
        if not items:
            return
        ttl = max(int(self.store.settings.reclaim_after_s) * 4, 60)  # outlives any live run
        calls = [
            {
                "job_id": c.job_id,
                "worker": c.worker_id,
                "lease": c.lease,
                "ttl": ttl,
                "message": json.dumps({"type": "preview", "id": c.job_id, **message}),
            }
            for c, message in items
        ]
        if self.store.settings.redis_cluster:
            await asyncio.gather(*(self.store.run(run_scripts.PREVIEW, **a) for a in calls))
            return
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for args in calls:
                await self.store.run(run_scripts.PREVIEW, pipe=pipe, **args)
            await pipe.execute()

    async def canceled(self, job_ids: Sequence[str]) -> set[str]:
        """Of ``job_ids``, those canceled (or gone): one round trip for a whole batch."""
        if not job_ids:
            return set()
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.store.keys.job(job_id), "status")
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
        refs = await self._put_results(claim, images, fmt)
        done = await self.store.run(
            outcome_scripts.FINISH,
            job_id=claim.job_id,
            worker=claim.worker_id,
            lease=claim.lease,
            now=repr(time.time()),
            result_ttl=self.store.settings.result_ttl_s,
            job_ttl=self.store.job_ttl,
            seeds_json=json.dumps(list(seeds)),
            latency_bounds=_csv(LATENCY_BOUNDS),
            format=fmt,
            refs_json="" if refs is None else json.dumps(refs),
            rest=list(images) if refs is None else [],
        )
        if not done and refs:
            await self.store.results.delete(refs)  # type: ignore[union-attr]
        return bool(done)

    async def _put_results(
        self, claim: Claim, images: Sequence[bytes], fmt: str
    ) -> list[str] | None:
        """Write the images to the result store first (None: they go into Redis). Names
        carry the lease, so a stale run never overwrites the current one's objects."""
        results = self.store.results
        if results is None:
            return None
        refs = [object_name(claim.job_id, claim.lease, i, fmt) for i in range(len(images))]
        content_type = CONTENT_TYPES.get(fmt, "application/octet-stream")
        await asyncio.gather(
            *(results.put(n, d, content_type) for n, d in zip(refs, images, strict=True))
        )
        return refs

    async def expire_results(self) -> int:
        """Delete result objects older than ``result_ttl_s`` (plus a minute, so a job whose
        record says it still has images never loses them first); call it now and then."""
        if self.store.results is None:
            return 0  # Redis expires them itself
        s = self.store.settings
        return await self.store.results.sweep(
            s.result_ttl_s + 60, inputs_older_than_s=s.input_ttl_s + 60
        )

    async def fail(self, claim: Claim, code: str, message: str) -> bool:
        """Mark the job failed for good (no retry); guarded like :meth:`finish`."""
        done = await self.store.run(
            outcome_scripts.FAIL,
            job_id=claim.job_id,
            worker=claim.worker_id,
            lease=claim.lease,
            now=repr(time.time()),
            job_ttl=self.store.job_ttl,
            code=code,
            message=message,
        )
        return bool(done)

    async def release(self, claim: Claim) -> bool:
        """Hand a running job back (drain timeout): queued again, next reclaim takes it,
        and this run does not count as an attempt."""
        done = await self.store.run(
            outcome_scripts.RELEASE,
            job_id=claim.job_id,
            worker=claim.worker_id,
            lease=claim.lease,
            now=repr(time.time()),
        )
        return bool(done)

    async def record_batch(self, rows: int | Sequence[int]) -> None:
        """Add UNet call sizes (rows per call) to ``ldmserve_unet_batch_rows``."""
        values = [rows] if isinstance(rows, int) else list(rows)
        if values:
            await self.store.run(
                run_scripts.OBSERVE,
                name="unet_batch_rows",
                bounds=_csv(BATCH_ROW_BOUNDS),
                rest=values,
            )
