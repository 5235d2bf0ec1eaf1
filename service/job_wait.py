"""Waiting in the API for a job to end: ``Prefer: wait=N`` and the synchronous compat APIs.

The job's pub/sub channel is subscribed *before* the record is read, so a final status
published in between is not missed; only status messages trigger a re-read (progress is
ignored), and the record is re-read every ``poll_s`` anyway in case a message was lost.
"""

from __future__ import annotations

import json
import time

import anyio

from service.queue import ApiQueue, JobRecord
from service.schemas import TERMINAL_STATUSES


async def wait_for_job(
    queue: ApiQueue, job_id: str, timeout_s: float, poll_s: float = 5.0
) -> JobRecord | None:
    """The job's record once it ended, or its latest record when ``timeout_s`` passed
    (None if it is unknown or expired)."""
    deadline = time.monotonic() + timeout_s
    pubsub = queue.store.redis.pubsub()
    try:
        await pubsub.subscribe(queue.store.keys.events(job_id))
        while True:
            record = await queue.get(job_id)
            left = deadline - time.monotonic()
            if record is None or record.status in TERMINAL_STATUSES or left <= 0:
                return record
            await _status_message(pubsub, min(left, poll_s))
    finally:
        with anyio.move_on_after(2.0, shield=True):  # the client may be gone: still close
            await pubsub.aclose()


async def _status_message(pubsub: object, wait_s: float) -> None:
    """Return at the next status message, or after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)  # type: ignore[attr-defined]
        if message is not None and json.loads(message["data"]).get("type") == "status":
            return
