"""The Redis data model (job hash + stream, Lua scripts); no torch, no model imports."""

from service.queue.job_queue import (
    Claim,
    IdempotencyMismatch,
    JobQueue,
    JobRecord,
    OwnerQueueFull,
    QueueFull,
    RateLimited,
    SubmitResult,
    WorkerInfo,
    new_worker_id,
)

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
