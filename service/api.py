"""The HTTP API: ``create_app(settings)`` builds the FastAPI app; the lifespan owns Redis.

This process imports neither torch nor ``model`` (checked by a test): it only talks to
Redis, so it starts fast and runs without a GPU. Routes are documented in
docs/ARCHITECTURE.md; request validation rules in :mod:`service.schemas`.

This module assembles the app (:func:`create_app`: lifespan, routers, middleware); the
routes are by role in :mod:`service.api_jobs` (``/v1/jobs``) and :mod:`service.api_info`
(models, LoRAs, samplers, health, metrics), over the dependencies in :mod:`service.api_deps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import openapi_limits, playground
from service.api_errors import BodyLimitMiddleware, install_error_handlers
from service.api_info import router as info_router
from service.api_jobs import router as jobs_router
from service.auth import AuthMiddleware, KeyRing, is_loopback_host, metrics_readers
from service.compat import a1111 as a1111_compat
from service.compat import openai as openai_compat
from service.queue import ApiQueue
from service.settings import Settings
from service.submission import new_job_id as new_job_id  # re-exported (tests, old callers)

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; Redis is connected lazily, so the app starts even while it is down."""
    settings = settings or Settings()
    keys = KeyRing.from_settings(settings.api_keys, settings.api_keys_file)
    if not keys.enabled and not is_loopback_host(settings.host):
        log.warning("auth is OFF (no LDMSERVE_API_KEYS) while binding %s: anyone who can "
                    "reach this port can submit and read every job", settings.host)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue = ApiQueue.connect(settings)
        app.state.queue = queue
        dispatch: asyncio.Task[None] | None = None
        if settings.webhook_secret is not None:
            from service.webhook_dispatch import WebhookDispatcher  # httpx: only when needed

            app.state.webhooks = WebhookDispatcher(queue.store)
            dispatch = asyncio.create_task(app.state.webhooks.run())
        try:
            yield
        finally:
            if dispatch is not None:
                app.state.webhooks.stop()
                done, _ = await asyncio.wait({dispatch}, timeout=settings.webhook_timeout_s + 2)
                if not done:
                    dispatch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await dispatch
            await queue.aclose()

    app = FastAPI(
        title="ldmserve",
        version="0.1.0",
        description="Asynchronous Stable Diffusion jobs with step-level continuous batching.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app, settings.redis_retry_after_s)
    app.include_router(jobs_router)
    app.include_router(info_router)
    openai_compat.install(app)
    a1111_compat.install(app)
    playground.install(app)
    openapi_limits.install(app, settings)
    # Middleware added last runs first: CORS (preflights need no key), then auth (a bad key
    # is refused before the body is read or validated), then the body limit.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        larger={
            ("POST", path): settings.max_image_body_bytes
            for path in ("/v1/jobs", "/v1/images/edits", "/sdapi/v1/img2img")
        },
    )
    app.add_middleware(
        AuthMiddleware,
        keys=keys,
        metrics_public=settings.metrics_public,
        metrics_readers=metrics_readers(keys, settings.metrics_keys),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "Idempotency-Key", "Authorization"],
            expose_headers=["Location", "Retry-After"],
        )
    return app
