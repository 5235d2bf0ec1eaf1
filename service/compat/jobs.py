"""Submit a native job and wait for it: what both synchronous compatible APIs do."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.auth import ANONYMOUS, MAX_PRIORITY_SCOPE_KEY, OWNER_SCOPE_KEY
from service.job_wait import wait_for_job
from service.queue import ApiQueue, JobRecord
from service.schemas import TERMINAL_STATUSES
from service.settings import Settings
from service.submission import native_request, submit


@dataclass(frozen=True)
class Outcome:
    """A compat call's job: its id and its record when the wait ended (None: expired)."""

    job_id: str
    record: JobRecord | None

    @property
    def finished(self) -> bool:
        return self.record is not None and self.record.status in TERMINAL_STATUSES


async def start_job(
    fields: Mapping[str, Any],
    *,
    queue: ApiQueue,
    settings: Settings,
    owner: str,
    idempotency_key: str | None = None,
    max_priority: str = "normal",
) -> str:
    """Submit ``fields`` (native names) for ``owner``; the job id. Raises ApiError."""
    result = await submit(
        native_request(fields),
        queue=queue,
        settings=settings,
        owner=owner,
        idempotency_key=idempotency_key,
        max_priority=max_priority,
    )
    return result.job_id


async def run_job(
    fields: Mapping[str, Any],
    *,
    queue: ApiQueue,
    settings: Settings,
    owner: str,
    idempotency_key: str | None = None,
    max_priority: str = "normal",
) -> Outcome:
    """:func:`start_job`, then wait up to ``compat_wait_s`` for the job to end."""
    job_id = await start_job(
        fields, queue=queue, settings=settings, owner=owner, idempotency_key=idempotency_key,
        max_priority=max_priority,
    )  # fmt: skip
    record = await wait_for_job(queue, job_id, settings.compat_wait_s, settings.sse_poll_s)
    return Outcome(job_id, record)


async def images_of(queue: ApiQueue, record: JobRecord) -> list[bytes] | None:
    """Every encoded image of a succeeded job, None once they expired."""
    out = []
    for i in range(record.image_count):
        data = await queue.image(record.id, i)
        if data is None:
            return None
        out.append(data)
    return out


@dataclass(frozen=True)
class Caller:
    """What a compat route needs from the app and the request (the native dependencies
    live in service.api, which includes these routers: read the same state here)."""

    queue: ApiQueue
    settings: Settings
    owner: str
    max_priority: str = "normal"  # the highest job priority the caller's key may use


def caller(request: Request) -> Caller:
    """The app's queue and settings and the caller's key name (``anonymous`` without auth)."""
    state = request.app.state
    owner = str(request.scope.get(OWNER_SCOPE_KEY, ANONYMOUS))
    top = str(request.scope.get(MAX_PRIORITY_SCOPE_KEY, "normal"))
    return Caller(state.queue, state.settings, owner, top)


def route_class(unavailable: Callable[[int], Exception]) -> type[APIRoute]:
    """An APIRoute whose handler turns an unreachable Redis into ``unavailable(retry_s)``
    (raised, so the compat API's own handler answers it in its error shape) — without
    this, the app-wide handler would answer a compat client in the native shape."""

    class CompatRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except (RedisConnectionError, RedisTimeoutError):
                    retry_s = request.app.state.settings.redis_retry_after_s
                    raise unavailable(retry_s) from None

            return guarded

    return CompatRoute
