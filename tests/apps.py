"""The real FastAPI app behind an in-process ASGI client (API tests; no uvicorn)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
from fastapi import FastAPI

from service.api import create_app
from service.settings import Settings

AppClientFactory = Callable[..., Awaitable[tuple[httpx.AsyncClient, FastAPI]]]


async def open_app_client(
    stack: AsyncExitStack, redis_url: str, **overrides: Any
) -> tuple[httpx.AsyncClient, FastAPI]:
    """App with its lifespan entered and a client for it, both closed with ``stack``."""
    app = create_app(Settings(**{"redis_url": redis_url, **overrides}))
    await stack.enter_async_context(app.router.lifespan_context(app))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    await stack.enter_async_context(client)
    return client, app


async def post_job(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    """POST /v1/jobs with a default prompt."""
    return await client.post("/v1/jobs", json={"prompt": "a lighthouse at dusk", **body})
