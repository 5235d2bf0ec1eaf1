"""The plain records the queue returns: job, claim, submit outcome, worker heartbeat.

No Redis here: these are values, decoded from replies by :mod:`service.queue.api_side` and
:mod:`service.queue.worker_side`.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from service.queue.keys import ANONYMOUS


def text(value: bytes | str | None) -> str | None:
    """A Redis reply field as str (replies are bytes; None stays None)."""
    return value.decode() if isinstance(value, bytes) else value


def new_worker_id() -> str:
    """A consumer name unique to this process start: a restarted worker must not inherit
    (and then never finish) the entries its previous life left pending."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker announces in its heartbeat (for /readyz, /v1/models, metrics)."""

    worker_id: str
    model: str
    max_batch: int
    device: str
    started_at: float
    capabilities: dict[str, Any] | None = None  # model.capabilities.Capabilities.to_dict()

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


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
