"""Server-Sent Events for one job: ``GET /v1/jobs/{id}/events``.

Stream content (each event's ``data`` is one JSON object):

* ``event: job`` — the full job view (as ``GET /v1/jobs/{id}``), first on connect and on
  every status change (queued → running, or back to queued after a hand-back);
* ``event: progress`` — ``{"id", "step", "total", "eta_s"}`` after each denoising step;
* ``event: preview`` — ``{"id", "step", "total", "width", "height", "image"}`` for a job
  submitted with ``preview: true``: a base64 PNG of its first image's current latents
  (`model.preview`, latent resolution) every ``preview_every_steps`` evaluations; the
  latest one also right after the first ``job`` event when connecting to a running job;
* ``event: done`` — the full job view in its final status (succeeded | failed | canceled),
  after which the server closes the stream;
* ``event: error`` — the job store became unreachable (or the job expired); stream ends.

Lines starting with ``:`` are keep-alives. The channel is subscribed *before* the job is
first read, so nothing published in between is lost; the job hash is also re-read every
``sse_poll_s`` so a message lost to a reconnect only delays, never stalls, the stream.
"""

from __future__ import annotations

import contextlib
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


# Messages workers publish that readers get as they are (the "type" becomes the event name).
_FORWARDED = ("progress", "preview")

Event = tuple[str, dict[str, Any]] | None  # (event name, data); None: a keep-alive is due


async def job_events(
    queue: ApiQueue, job_id: str, poll_s: float, keepalive_s: float
) -> AsyncIterator[str]:
    """Yield SSE frames for ``job_id`` until it reaches a final status."""
    async with contextlib.aclosing(job_event_stream(queue, job_id, poll_s, keepalive_s)) as events:
        async for event in events:
            yield ": keepalive\n\n" if event is None else format_event(*event)


async def job_event_stream(
    queue: ApiQueue, job_id: str, poll_s: float, keepalive_s: float
) -> AsyncIterator[Event]:
    """The job's events as data, for the native stream and the compat APIs' streams."""
    pubsub = queue.store.redis.pubsub()
    try:
        await pubsub.subscribe(queue.store.keys.events(job_id))
        record = await queue.get(job_id)
        if record is None:
            yield "error", {"code": "job_not_found", "message": "job not found"}
            return
        status = record.status
        yield "job", JobView.from_record(record).model_dump(mode="json")
        if status == "running" and (latest := await queue.preview(job_id)) is not None:
            latest.pop("type", None)
            yield "preview", latest
        last_read = last_sent = time.monotonic()
        final_seen = status in TERMINAL_STATUSES  # ended before we subscribed: no message due
        while status not in TERMINAL_STATUSES:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
            now = time.monotonic()
            payload = json.loads(message["data"]) if message else {}
            final_seen = _is_final(payload)
            if payload.get("type") in _FORWARDED:
                # Published in order before the final status message, and only by the
                # current lease holder: forward every one, even if the re-read below
                # already sees the job finished (a loaded server reads late).
                yield payload.pop("type"), payload
                last_sent = now
                if now - last_read < poll_s:
                    continue
            record = await queue.get(job_id)
            last_read = now
            if record is None:
                yield "error", {"code": "job_expired", "message": "job expired"}
                return
            if record.status != status:
                status = record.status
                if status not in TERMINAL_STATUSES:
                    yield "job", JobView.from_record(record).model_dump(mode="json")
                    last_sent = now
            elif now - last_sent >= keepalive_s:
                yield None
                last_sent = now
        if not final_seen:
            # The hash was read as final before the final status message arrived: progress
            # published before it may still be in flight; forward it, in order, first.
            async for event in _drain_forwarded(pubsub, poll_s):
                yield event
        yield "done", JobView.from_record(record).model_dump(mode="json")
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("SSE for job %s lost Redis: %s", job_id, exc)
        yield "error", {"code": "redis_unavailable", "message": "job store unreachable; reconnect"}
    finally:
        # The client may be gone: the task is being cancelled, so shield the close or the
        # subscribed connection would leak.
        with anyio.move_on_after(2.0, shield=True):
            await pubsub.aclose()


def _is_final(payload: dict[str, Any]) -> bool:
    return payload.get("type") == "status" and payload.get("status") in TERMINAL_STATUSES


async def _drain_forwarded(pubsub: Any, wait_s: float) -> AsyncIterator[Event]:
    """Progress / preview events received until the final status message (at most ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is None:
            return
        payload = json.loads(message["data"])
        if _is_final(payload):
            return
        if (kind := payload.pop("type", None)) in _FORWARDED:
            yield kind, payload
