"""Why a submit was refused: the API maps each to its HTTP answer (429, 409)."""

from __future__ import annotations


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
