"""Redis key layout and the plain records :class:`service.queue.JobQueue` reads and returns.

Key layout (``P`` = ``Settings.key_prefix``, default ``ldmserve``); the Lua preamble in
:mod:`service.queue.scripts` derives the same names:

==================================  ======  ==================================================
``P:model:{model}:stream``          stream  one entry per job (field ``job``); group ``workers``
``P:model:{model}:queued``          zset    queued job ids scored by submit order (position)
``P:job:{id}``                      hash    the job record (see :class:`JobRecord`)
``P:job:{id}:images``               hash    ``"0"``, ``"1"``, … → encoded image bytes (TTL)
``P:job:{id}:events``               pubsub  progress / status messages (JSON) for SSE
``P:idem:{sha256(owner\nkey)}``     string  Idempotency-Key → job id (scoped per owner)
``P:owner:{owner}:active``          set     the owner's unfinished job ids (per-key cap)
``P:rate:{owner}``                  string  GCRA state of the owner's submits (service.ratelimit)
``P:webhooks``                      stream  webhook deliveries due now; group ``dispatchers``
``P:webhooks:retry``                zset    deliveries waiting for a retry, scored by due ms
``P:worker:{worker_id}``            string  heartbeat: JSON :class:`WorkerInfo`, TTL
``P:workers``                       zset    worker ids by last heartbeat (for listing)
``P:running``                       set     ids of running jobs (gauge)
``P:models``                        set     models that ever had a stream (metrics)
``P:metrics``                       hash    counters and histograms (see service.metrics)
``P:seq``                           string  submit counter (queue order)
==================================  ======  ==================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

GROUP = "workers"
WEBHOOK_GROUP = "dispatchers"
ANONYMOUS = "anonymous"  # the owner of every job while auth is off (service.auth)
LATENCY_BOUNDS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_ROW_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def text(value: bytes | str | None) -> str | None:
    """A Redis reply field as str (replies are bytes; None stays None)."""
    return value.decode() if isinstance(value, bytes) else value


def new_worker_id() -> str:
    """A consumer name unique to this process start: a restarted worker must not inherit
    (and then never finish) the entries its previous life left pending."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class QueueFull(Exception):
    """The model's queue holds ``max_queue`` jobs; the API answers 429 + Retry-After."""


class OwnerQueueFull(QueueFull):
    """The key holds ``max_queued_per_key`` unfinished jobs (429 + Retry-After)."""


class RateLimited(Exception):
    """The key submitted faster than ``rate_limit_per_min`` allows (429 + Retry-After)."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"rate limit exceeded; retry in {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class IdempotencyMismatch(Exception):
    """An Idempotency-Key was reused with a different request body."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Idempotency-Key already used for job {job_id} with another body")
        self.job_id = job_id


@dataclass(frozen=True)
class Keys:
    """Names of every key for one prefix, so nothing else formats key strings."""

    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def images(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:images"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def stream(self, model: str) -> str:
        return f"{self.prefix}:model:{model}:stream"

    def queued(self, model: str) -> str:
        return f"{self.prefix}:model:{model}:queued"

    def idem(self, key: str, owner: str = ANONYMOUS) -> str:
        digest = hashlib.sha256(f"{owner}\n{key}".encode()).hexdigest()
        return f"{self.prefix}:idem:{digest}"

    def owner_active(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:active"

    def rate(self, owner: str) -> str:
        return f"{self.prefix}:rate:{owner}"

    @property
    def webhooks(self) -> str:
        return f"{self.prefix}:webhooks"

    @property
    def webhooks_retry(self) -> str:
        return f"{self.prefix}:webhooks:retry"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def running(self) -> str:
        return f"{self.prefix}:running"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}:metrics"


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker announces in its heartbeat (for /readyz, /v1/models, metrics)."""

    worker_id: str
    model: str
    max_batch: int
    device: str
    started_at: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Claim:
    """A worker's lease on one run of a job; pass it back to progress/finish/fail/release.

    ``lease`` increases on every (re)claim and guards every write: a worker whose claim was
    taken over holds a stale lease and its writes are refused. ``attempt`` counts runs
    (drained runs handed back with ``release`` do not count).
    """

    job_id: str
    worker_id: str
    lease: int
    attempt: int
    params: dict[str, Any]
    entry_id: str
    model: str


@dataclass(frozen=True)
class SubmitResult:
    """Outcome of a submit (one round trip): the job, and whether this call created it."""

    job_id: str
    created: bool
    status: str
    queue_position: int | None
    params: dict[str, Any]


def _f(raw: dict[str, str], name: str) -> float | None:
    value = raw.get(name)
    return float(value) if value not in (None, "") else None


@dataclass(frozen=True)
class JobRecord:
    """Decoded job hash."""

    id: str
    status: str
    model: str
    params: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempt: int = 0
    worker: str | None = None
    step: int | None = None
    total: int | None = None
    eta_s: float | None = None
    error_code: str | None = None
    error: str | None = None
    image_count: int = 0
    seeds: list[int] = field(default_factory=list)
    format: str | None = None
    expires_at: float | None = None
    queue_position: int | None = None
    owner: str = ANONYMOUS
    webhook_url: str | None = None

    @classmethod
    def from_hash(cls, raw: dict[str, str], queue_position: int | None = None) -> JobRecord:
        """Build from HGETALL output (decoded strings)."""
        step, total = raw.get("step"), raw.get("total")
        return cls(
            id=raw["id"],
            status=raw["status"],
            model=raw["model"],
            params=json.loads(raw["params"]),
            created_at=float(raw["created_at"]),
            started_at=_f(raw, "started_at"),
            finished_at=_f(raw, "finished_at"),
            attempt=int(raw.get("attempt", 0)),
            worker=raw.get("worker"),
            step=int(step) if step else None,
            total=int(total) if total else None,
            eta_s=_f(raw, "eta_s"),
            error_code=raw.get("error_code"),
            error=raw.get("error"),
            image_count=int(raw.get("image_count", 0)),
            seeds=json.loads(raw["seeds"]) if raw.get("seeds") else [],
            format=raw.get("format"),
            expires_at=_f(raw, "expires_at"),
            queue_position=queue_position,
            owner=raw.get("owner") or ANONYMOUS,
            webhook_url=raw.get("webhook") or None,
        )
