"""The compatible APIs answer an unreachable Redis in their own error shapes (503 +
Retry-After), not the native one: real app over ASGI, Redis on a port nobody listens on."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from service.redis_server import free_port
from tests.apps import open_app_client

pytestmark = pytest.mark.anyio


async def test_redis_down_is_503_in_each_shape() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with AsyncExitStack() as stack:
        client, _ = await open_app_client(stack, url, redis_timeout_s=0.5)
        r = await client.post("/v1/images/generations", json={"prompt": "a fox"})
        assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
        assert r.json()["error"]["type"] == "server_error"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        for method, path in (("POST", "/sdapi/v1/txt2img"), ("GET", "/sdapi/v1/progress"),
                             ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/interrupt")):  # fmt: skip
            r = await client.request(method, path, json={"prompt": "a fox"})
            assert r.status_code == 503 and r.headers["retry-after"] == "2", (path, r.text)
            assert r.json()["error"] == "redis_unavailable" and r.json()["detail"]
