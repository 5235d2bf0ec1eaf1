"""service.client against real processes (redis-server, ``ldmserve api``, a demo worker
whose ``slow:`` prompts take 0.25 s per step), and its retry rules against the real app."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    DoneEvent,
    InvalidRequest,
    JobEvent,
    JobTimeout,
    NotFound,
    PreviewEvent,
    ProgressEvent,
    RateLimited,
)
from tests.apps import AppClientFactory
from tests.conftest import LIVE_KEYS

SMALL = {"width": 64, "height": 64, "steps": 2, "guidance_scale": 1.0}


@pytest.fixture
def client(live_stack: Any) -> Any:
    with Client(live_stack.base, api_key=LIVE_KEYS["client"]) as c:
        yield c


def size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.mark.slow
def test_generate_returns_the_images(client: Client) -> None:
    images = client.generate("a lighthouse", num_images=2, seed=3, timeout=120, **SMALL)
    assert [size(b) for b in images] == [(64, 64), (64, 64)]
    assert images[0][:8] == b"\x89PNG\r\n\x1a\n"
    newest = next(client.jobs(status="succeeded"))
    assert newest.parameters["seed"] == 3
    assert [i.seed for i in newest.images] == [3, 4]


@pytest.mark.slow
def test_submit_stream_get_images(client: Client) -> None:
    job = client.submit(prompt="slow: a fox", width=64, height=64, steps=6, seed=9, preview=True)
    assert job.status == "queued" and job.seed == 9
    events = list(client.stream(job.id))
    assert isinstance(events[0], JobEvent) and isinstance(events[-1], DoneEvent)
    steps = [e.step for e in events if isinstance(e, ProgressEvent)]
    assert steps and steps == sorted(steps) and steps[-1] == 6
    (preview,) = [e for e in events if isinstance(e, PreviewEvent)]  # after evaluation 5
    assert preview.id == job.id and (preview.step, preview.total) == (5, 6)
    assert size(preview.png) == (preview.width, preview.height) == (8, 8)
    final = events[-1].job
    assert final.status == "succeeded" and final.images[0].seed == 9
    assert client.get(job.id).status == "succeeded"
    assert [size(b) for b in client.images(job.id)] == [(64, 64)]


@pytest.mark.slow
def test_wait_timeout_then_cancel(client: Client) -> None:
    job = client.submit(prompt="slow: a castle", width=64, height=64, steps=60)
    with pytest.raises(JobTimeout) as err:
        client.wait(job.id, timeout=0.5)
    assert err.value.job.id == job.id and not err.value.job.done
    assert client.cancel(job.id).status == "canceled"
    assert client.wait(job.id, timeout=30).status == "canceled"


@pytest.mark.slow
def test_typed_errors(client: Client, live_stack: Any) -> None:
    with pytest.raises(NotFound):
        client.get("0" * 32)
    with pytest.raises(InvalidRequest) as err:
        client.submit(prompt="a fox", steps=0)
    assert err.value.status == 422 and err.value.field == "steps"
    with Client(live_stack.base, api_key="wrong") as bad, pytest.raises(AuthenticationError):
        bad.submit(prompt="a fox")


@pytest.mark.slow
@pytest.mark.anyio
async def test_async_client_has_the_same_methods(live_stack: Any) -> None:
    async with AsyncClient(live_stack.base, api_key=LIVE_KEYS["client"]) as client:
        images = await client.generate("a red fox", timeout=120, **SMALL)
        assert [size(b) for b in images] == [(64, 64)]
        job = await client.submit(prompt="slow: rain", width=64, height=64, steps=3)
        events = [e async for e in client.stream(job.id)]
        assert isinstance(events[-1], DoneEvent) and events[-1].job.status == "succeeded"
        assert len(await client.images(job.id)) == 1
        ids = [j.id async for j in client.jobs(page_size=1)]  # one job per page
        assert ids[0] == job.id and len(ids) == len(set(ids)) >= 2


@pytest.mark.anyio
async def test_429_is_retried_after_retry_after_only_with_an_idempotency_key(
    app_client_factory: AppClientFactory,
) -> None:
    _, app = await app_client_factory(rate_limit_per_min=60, rate_limit_burst=1)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    async with AsyncClient("http://test", http=http, max_retries=3) as client:
        first = await client.submit(prompt="a fox")
        with pytest.raises(RateLimited) as err:
            await client.submit(prompt="a fox")  # no key: never retried
        assert err.value.retry_after is not None and err.value.retry_after >= 1
        second = await client.submit(prompt="a fox", idempotency_key="k-1")  # waits, retries
        assert second.id != first.id and second.status == "queued"


def test_client_needs_only_httpx_and_pydantic() -> None:
    code = (
        "import sys, service.client; "
        "bad = [m for m in ('torch', 'model', 'fastapi', 'redis', 'PIL') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
