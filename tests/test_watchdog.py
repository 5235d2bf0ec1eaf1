"""The worker watchdog against a real Redis: stalls and device failures end the worker (exit
code EXIT_CODE, its jobs left for reclaim); jobs past max_job_runtime_s fail."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from service.queue import Claim, WorkerInfo
from service.settings import Settings
from service.watchdog import EXIT_CODE, RUNTIME_EXCEEDED, Watchdog, is_device_failure
from tests.queues import Queues

pytestmark = pytest.mark.anyio


@pytest.fixture
async def q(redis_url: str) -> AsyncIterator[Queues]:
    client = Redis.from_url(redis_url)
    yield Queues.on(client, Settings())
    await client.aclose()


async def running_claim(q: Queues, worker_id: str = "w1") -> Claim:
    job_id = uuid.uuid4().hex
    await q.api.submit({"prompt": "a", "seed": 1}, model="demo", job_id=job_id)
    await q.worker.heartbeat(WorkerInfo(worker_id, "demo", 8, "cpu", time.time()))
    (claim,) = await q.worker.claim(worker_id, "demo", 1)
    return claim


class Recorder:
    """Stands in for os._exit and Engine.cancel: records what the watchdog asked for."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, value: Any) -> None:
        self.calls.append(value)


@pytest.mark.parametrize(
    ("message", "fatal"),
    [
        ("UNet call failed: AcceleratorError: CUDA error: an illegal memory access", True),
        ("UNet call failed: RuntimeError: CUDA error: device-side assert triggered", True),
        ("decode failed: cuDNN error: CUDNN_STATUS_EXECUTION_FAILED", True),
        ("UNet call failed: RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED", True),
        ("UNet call failed: OutOfMemoryError: CUDA out of memory. Tried to allocate", False),
        ("UNet call failed: ValueError: shapes do not match", False),
        ("decode failed: NaN in latents", False),
        (None, False),
        ("", False),
    ],
)
def test_device_failures_are_told_from_job_errors(message: str | None, fatal: bool) -> None:
    assert is_device_failure(message) is fatal


async def test_a_stall_with_work_ends_the_worker_and_frees_its_jobs(q: Queues) -> None:
    claim = await running_claim(q)
    exits, canceled = Recorder(), Recorder()
    dog = Watchdog(Settings(watchdog_stall_s=5), q.worker, "w1", lambda: {claim.job_id: claim},
                   canceled, exit_process=exits)  # fmt: skip
    t0 = time.monotonic()
    await dog.check(t0)  # work appears: the stall clock starts now
    await dog.check(t0 + 4)
    assert dog.tripped is None
    dog.beat()  # progress resets it
    await dog.check(time.monotonic() + 4)
    assert dog.tripped is None
    assert exits.calls == []
    await dog.check(time.monotonic() + 6)
    assert dog.tripped and "no engine progress" in dog.tripped
    assert exits.calls == [EXIT_CODE] and canceled.calls == []
    assert (await q.api.get(claim.job_id)).status == "running"  # not failed: reclaimable
    await dog.run()  # already tripped: returns, exits no second time
    assert exits.calls == [EXIT_CODE]


async def test_idle_time_never_counts_as_a_stall(q: Queues) -> None:
    jobs: dict[str, Claim] = {}
    dog = Watchdog(Settings(watchdog_stall_s=5), q.worker, "w1", lambda: jobs, Recorder(),
                   exit_process=Recorder())  # fmt: skip
    t0 = time.monotonic()
    await dog.check(t0 + 100)  # idle for long
    jobs["x"] = await running_claim(q)
    await dog.check(t0 + 101)  # work starts: counted from here
    await dog.check(t0 + 105)
    assert dog.tripped is None
    await dog.check(t0 + 107)
    assert dog.tripped is not None


async def test_stall_check_off_at_zero(q: Queues) -> None:
    claim = await running_claim(q)
    dog = Watchdog(Settings(watchdog_stall_s=0), q.worker, "w1", lambda: {claim.job_id: claim},
                   Recorder(), exit_process=Recorder())  # fmt: skip
    await dog.check(time.monotonic())
    await dog.check(time.monotonic() + 10_000)
    assert dog.tripped is None


async def test_a_device_failure_trips_and_the_job_is_not_failed(q: Queues) -> None:
    claim = await running_claim(q)
    exits = Recorder()
    dog = Watchdog(Settings(), q.worker, "w1", lambda: {claim.job_id: claim}, Recorder(),
                   exit_process=exits)  # fmt: skip
    assert not dog.device_failed("UNet call failed: ValueError: bad shape")
    assert dog.tripped is None
    assert exits.calls == []
    assert dog.device_failed("UNet call failed: AcceleratorError: CUDA error: unspecified launch")
    assert exits.calls == [EXIT_CODE]
    # The job stays running under the dead worker: once its heartbeat is gone (expired;
    # deleted here), the next reclaim takes it over.
    await q.worker.unregister("w1")
    other = Queues.on(q.store.redis, Settings(reclaim_after_s=0))
    (taken,) = await other.worker.reclaim("w2", "demo", 1)
    assert taken.job_id == claim.job_id and taken.attempt == 2


async def test_jobs_past_the_runtime_limit_fail_with_a_clear_code(q: Queues) -> None:
    slow, fresh = await running_claim(q), await running_claim(q)
    jobs = {slow.job_id: slow}
    canceled = Recorder()
    dog = Watchdog(Settings(max_job_runtime_s=30), q.worker, "w1", lambda: jobs, canceled,
                   exit_process=Recorder())  # fmt: skip
    t0 = time.monotonic()
    await dog.check(t0)
    jobs[fresh.job_id] = fresh
    await dog.check(t0 + 20)
    assert canceled.calls == []
    await dog.check(t0 + 31)  # slow: 31 s since first seen; fresh: 11 s
    assert canceled.calls == [slow.job_id]
    record = await q.api.get(slow.job_id)
    assert record.status == "failed" and record.error_code == RUNTIME_EXCEEDED
    assert "max_job_runtime_s" in (record.error or "")
    assert (await q.api.get(fresh.job_id)).status == "running"
    assert dog.tripped is None  # a slow job is not a broken worker


async def test_no_runtime_limit_at_zero(q: Queues) -> None:
    claim = await running_claim(q)
    canceled = Recorder()
    dog = Watchdog(Settings(max_job_runtime_s=0, watchdog_stall_s=0), q.worker, "w1",
                   lambda: {claim.job_id: claim}, canceled, exit_process=Recorder())  # fmt: skip
    await dog.check(time.monotonic())
    await dog.check(time.monotonic() + 10_000)
    assert canceled.calls == [] and (await q.api.get(claim.job_id)).status == "running"
