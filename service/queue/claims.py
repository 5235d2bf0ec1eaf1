"""The worker side of the stream: registry of live workers, consumer group, claim, reclaim.

A mixin of :class:`service.queue.JobQueue` (which owns the connection, the key layout and
the registered Lua scripts); split out to keep each module about one thing. The stream
holds job ids; claiming moves them into this worker's pending list and the job hashes to
``running`` in one script (``ACTIVATE``), reclaiming takes over only entries of workers
whose heartbeat expired (``RECLAIM``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from service.queue.keys import GROUP, Claim, Keys, WorkerInfo, text
from service.settings import Settings


class StreamClaims:
    """Heartbeats, the consumer group and taking jobs off the stream (worker side)."""

    redis: Redis
    settings: Settings
    keys: Keys
    _groups: set[str]
    _activate: AsyncScript
    _reclaim: AsyncScript
    _prune: AsyncScript

    @property
    def _p(self) -> str:
        return self.keys.prefix

    @property
    def _job_ttl(self) -> int:
        return self.settings.result_ttl_s + self.settings.job_ttl_grace_s

    async def heartbeat(self, info: WorkerInfo) -> None:
        """Announce a live worker for ``worker_ttl_s``; its claims are safe while it beats."""
        ttl_ms = int(self.settings.worker_ttl_s * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.worker(info.worker_id), info.to_json(), px=ttl_ms)
            pipe.zadd(self.keys.workers, {info.worker_id: time.time()})
            await pipe.execute()

    async def unregister(self, worker_id: str) -> None:
        """Drop a worker's heartbeat now (after draining) so its leftovers are reclaimable."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.worker(worker_id))
            pipe.zrem(self.keys.workers, worker_id)
            await pipe.execute()

    async def live_workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat key has not expired (stale registry entries are pruned)."""
        ids = [text(w) or "" for w in await self.redis.zrange(self.keys.workers, 0, -1)]
        if not ids:
            return []
        values = await self.redis.mget([self.keys.worker(w) for w in ids])
        dead = [w for w, v in zip(ids, values, strict=True) if v is None]
        if dead:
            await self.redis.zrem(self.keys.workers, *dead)
        return [WorkerInfo.from_json(v) for v in values if v is not None]

    async def ensure_group(self, model: str) -> None:
        """Create the model's stream and consumer group (from the start: no entry skipped)."""
        try:
            await self.redis.xgroup_create(self.keys.stream(model), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(model)

    async def _with_group(self, model: str, call: Any) -> Any:
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
        return int(await self._with_group(model, lambda: self._prune(args=[self._p, model])))

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
        """Take up to ``count`` new jobs (the worker's free batch capacity).

        ``block_ms`` > 0 waits that long for new entries on a pooled connection of its own;
        keep it below ``redis_timeout_s`` (the socket timeout) or the wait times out. Entries whose job was canceled meanwhile
        are acked and skipped, so fewer than ``count`` may come back.
        """
        if count <= 0:
            return []
        stream = self.keys.stream(model)

        async def read() -> Any:
            return await self.redis.xreadgroup(
                GROUP, worker_id, {stream: ">"}, count=count, block=block_ms or None
            )

        response = await self._with_group(model, read)
        pairs: list[str] = []
        for _name, entries in response or []:
            for entry_id, fields in entries:
                pairs += [text(entry_id) or "", text(fields.get(b"job")) or ""]
        if not pairs:
            return []
        rows = await self._activate(args=[self._p, worker_id, repr(time.time()), *pairs, model])
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
        args = [
            self._p,
            worker_id,
            repr(time.time()),
            model,
            int(self.settings.reclaim_after_s * 1000),
            count,
            self.settings.max_attempts,
            self._job_ttl,
            max(1000, 10 * count),
        ]

        async def run() -> Any:
            return await self._reclaim(args=args)

        rows = await self._with_group(model, run)
        return self._claims(worker_id, model, rows)
