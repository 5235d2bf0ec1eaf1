"""OpenAI Images streaming (``stream: true``): the native event stream as SSE, with
``image_generation.partial_image`` events from live previews and one
``image_generation.completed`` per image.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.compat.jobs import (
    Caller,
    Outcome,
    images_of,
)
from service.compat.openai_answers import job_error, size_of
from service.compat.openai_errors import (
    OpenAIError,
    unavailable,
)
from service.sse import job_event_stream

# One logger for the OpenAI API's log lines, whichever of its modules writes them.
log = logging.getLogger("service.compat.openai")


_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


def _redis_down(c: Caller) -> OpenAIError:
    return unavailable(c.settings.redis_retry_after_s)


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, separators=(',', ':'))}\n\n"


def _partial_due(step: int, total: int, sent: int, wanted: int) -> bool:
    """Whether a preview at ``step`` of ``total`` becomes partial image ``sent`` of ``wanted``:
    the partials are spread over the run (thresholds at 1/(wanted+1), 2/(wanted+1), ...)."""
    return sent < wanted and step * (wanted + 1) >= (sent + 1) * total


async def stream_job(
    request: Request, c: Caller, job_id: str, prompt: str, partial_images: int
) -> AsyncIterator[str]:
    """SSE: keep-alives while the job runs, up to ``partial_images``
    ``image_generation.partial_image`` events from its live previews (PNG at latent
    resolution, spread over the run; fewer when the job has fewer previews, as OpenAI allows),
    then one ``image_generation.completed`` per image."""
    s = c.settings
    deadline = time.monotonic() + s.compat_wait_s
    record, sent = None, 0
    events = job_event_stream(c.queue, job_id, s.sse_poll_s, s.sse_keepalive_s)
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                if event is None:
                    yield ": keepalive\n\n"
                elif event[0] == "preview" and _partial_due(
                    event[1]["step"], event[1]["total"], sent, partial_images
                ):
                    yield _event(
                        "image_generation.partial_image",
                        {
                            "b64_json": event[1]["image"],
                            "created_at": int(time.time()),
                            "size": f"{event[1]['width']}x{event[1]['height']}",
                            "quality": "auto",
                            "background": "opaque",
                            "output_format": "png",
                            "partial_image_index": sent,
                        },
                    )
                    sent += 1
                elif event[0] in ("done", "error"):
                    break
                if time.monotonic() > deadline:
                    break
        record = await c.queue.get(job_id)
        outcome = Outcome(job_id, record)
        error = job_error(outcome, s.compat_wait_s)
        if error is not None:
            yield _event("error", error.body())
            return
        assert record is not None
        images = await images_of(c.queue, record) or []
        for i, data in enumerate(images):
            yield _event(
                "image_generation.completed",
                {
                    "b64_json": base64.b64encode(data).decode(),
                    "created_at": int(time.time()),
                    "size": size_of(outcome),
                    "quality": "auto",
                    "background": "opaque",
                    "output_format": record.format or "png",
                    "image_index": i,
                    "usage": _USAGE,
                },
            )
    except (RedisConnectionError, RedisTimeoutError):
        yield _event("error", _redis_down(c).body())
    finally:
        log.info("openai stream job=%s ended (%s)", job_id, record.status if record else "?")
