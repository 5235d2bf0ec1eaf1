"""Reads over one owner's jobs: ``GET /v1/jobs`` pages and the A1111 progress/interrupt view.

The index ``P:owner:{owner}:jobs`` (a zset scored by submit order) is written by the
SUBMIT script (service.queue.request_scripts); ids whose record expired are dropped here as they
are met. The unfinished set ``P:owner:{owner}:active`` is the queue's own (per-key cap).
Kept apart from :mod:`service.queue` on purpose: read-only, API side, owner-scoped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from service.queue import ApiQueue, JobRecord
from service.queue.records import text

_SCAN_BATCH = 100
_MAX_SCANNED = 5000  # a status filter reads at most this many records per page


@dataclass(frozen=True)
class JobPage:
    """One page of an owner's jobs, newest first; ``next_cursor`` None at the end."""

    records: list[JobRecord]
    next_cursor: str | None


async def _records(queue: ApiQueue, ids: list[str]) -> list[JobRecord | None]:
    """Job records for ``ids`` in one round trip (queue positions included)."""
    async with queue.store.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hgetall(queue.store.keys.job(job_id))
        raws = await pipe.execute()
    out: list[JobRecord | None] = []
    queued: list[tuple[int, str, str]] = []
    for i, raw in enumerate(raws):
        if not raw or b"status" not in raw:
            out.append(None)
            continue
        decoded = {k.decode(): v.decode() for k, v in raw.items()}
        out.append(JobRecord.from_hash(decoded))
        if decoded["status"] == "queued":
            queued.append((i, decoded["model"], decoded["id"]))
    if queued:
        async with queue.store.redis.pipeline(transaction=False) as pipe:
            for _, model, job_id in queued:
                pipe.zrank(queue.store.keys.queued(model), job_id)
            ranks = await pipe.execute()
        for (i, _, _), rank in zip(queued, ranks, strict=True):
            record = out[i]
            if record is not None and rank is not None:
                out[i] = replace(record, queue_position=int(rank))
    return out


async def page(
    queue: ApiQueue,
    owner: str,
    *,
    limit: int,
    cursor: str | None = None,
    status: str | None = None,
) -> JobPage:
    """Up to ``limit`` of ``owner``'s jobs older than ``cursor``, newest first."""
    key = queue.store.keys.owner_jobs(owner)
    upper = f"({int(cursor)}" if cursor else "+inf"
    found: list[JobRecord] = []
    scanned = 0
    last_score: int | None = None
    while len(found) < limit and scanned < _MAX_SCANNED:
        rows = await queue.store.redis.zrevrangebyscore(
            key, upper, "-inf", start=0, num=_SCAN_BATCH, withscores=True
        )
        if not rows:
            return JobPage(found, None)
        ids = [text(member) or "" for member, _ in rows]
        records = await _records(queue, ids)
        gone = [job_id for job_id, r in zip(ids, records, strict=True) if r is None]
        if gone:
            await queue.store.redis.zrem(key, *gone)
        for (_, score), record in zip(rows, records, strict=True):
            scanned += 1
            last_score = int(score)
            if record is not None and (status is None or record.status == status):
                found.append(record)
                if len(found) == limit:
                    break
        upper = f"({last_score}"
    more = await queue.store.redis.zrevrangebyscore(key, upper, "-inf", start=0, num=1)
    return JobPage(found, str(last_score) if more and last_score is not None else None)


async def active(queue: ApiQueue, owner: str) -> list[JobRecord]:
    """The owner's queued and running jobs, oldest first."""
    ids = sorted(
        text(m) or ""
        for m in await queue.store.redis.smembers(queue.store.keys.owner_active(owner))
    )
    records = [r for r in await _records(queue, ids) if r is not None]
    live = [r for r in records if r.status in ("queued", "running")]
    return sorted(live, key=lambda r: r.created_at)
