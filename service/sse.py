"""Server-Sent Events for one job: ``GET /v1/jobs/{id}/events``.

Stream content (each event's ``data`` is one JSON object):

* ``event: job`` — the full job view (as ``GET /v1/jobs/{id}``), first on connect and on
  every status change (queued → running, or back to queued after a hand-back);
* ``event: progress`` — ``{"id", "step", "total", "eta_s"}`` after each denoising step;
* ``event: done`` — the full job view in its final status (succeeded | failed | canceled),
  after which the server closes the stream;
* ``event: error`` — the job store became unreachable (or the job expired); stream ends.

Lines starting with ``:`` are keep-alives. The channel is subscribed *before* the job is
first read, so nothing published in between is lost; the job hash is also re-read every
``sse_poll_s`` so a message lost to a reconnect only delays, never stalls, the stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.queue import ApiQueue
from service.schemas import TERMINAL_STATUSES, JobView

log = logging.getLogger(__name__)


def format_event(event: str, data: Any) -> str:
    """One SSE frame."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def job_events(
    queue: ApiQueue, job_id: str, poll_s: float, keepalive_s: float
) -> AsyncIterator[str]:
    """Yield SSE frames for ``job_id`` until it reaches a final status."""
    pubsub = queue.store.redis.pubsub()
    try:
        await pubsub.subscribe(queue.store.keys.events(job_id))
        record = await queue.get(job_id)
        if record is None:
            yield format_event("error", {"code": "job_not_found", "message": "job not found"})
            return
        status = record.status
        yield format_event("job", JobView.from_record(record).model_dump(mode="json"))
        last_read = last_sent = time.monotonic()
        final_seen = status in TERMINAL_STATUSES  # ended before we subscribed: no message due
        while status not in TERMINAL_STATUSES:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
            now = time.monotonic()
            payload = json.loads(message["data"]) if message else {}
            final_seen = _is_final(payload)
            if payload.get("type") == "progress":
                # Published in order before the final status message, and only by the
                # current lease holder: forward every one, even if the re-read below
                # already sees the job finished (a loaded server reads late).
                payload.pop("type")
                yield format_event("progress", payload)
                last_sent = now
                if now - last_read < poll_s:
                    continue
            record = await queue.get(job_id)
            last_read = now
            if record is None:
                yield format_event("error", {"code": "job_expired", "message": "job expired"})
                return
            if record.status != status:
                status = record.status
                if status not in TERMINAL_STATUSES:
                    yield format_event("job", JobView.from_record(record).model_dump(mode="json"))
                    last_sent = now
            elif now - last_sent >= keepalive_s:
                yield ": keepalive\n\n"
                last_sent = now
        if not final_seen:
            # The hash was read as final before the final status message arrived: progress
            # published before it may still be in flight; forward it, in order, first.
            async for frame in _drain_progress(pubsub, poll_s):
                yield frame
        yield format_event("done", JobView.from_record(record).model_dump(mode="json"))
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("SSE for job %s lost Redis: %s", job_id, exc)
        yield format_event(
            "error", {"code": "redis_unavailable", "message": "job store unreachable; reconnect"}
        )
    finally:
        # The client may be gone: the task is being cancelled, so shield the close or the
        # subscribed connection would leak.
        with anyio.move_on_after(2.0, shield=True):
            await pubsub.aclose()


def _is_final(payload: dict[str, Any]) -> bool:
    return payload.get("type") == "status" and payload.get("status") in TERMINAL_STATUSES


async def _drain_progress(pubsub: Any, wait_s: float) -> AsyncIterator[str]:
    """Progress frames received until the final status message (at most ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is None:
            return
        payload = json.loads(message["data"])
        if _is_final(payload):
            return
        if payload.pop("type", None) == "progress":
            yield format_event("progress", payload)
