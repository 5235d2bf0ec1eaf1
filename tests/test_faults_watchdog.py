"""The watchdog with real worker processes (tests/fault_worker.py): a hung UNet step and a
broken device each end the worker with the watchdog's exit code, its job is not failed,
and a healthy worker started next takes it over and finishes it (attempt 2)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.watchdog import EXIT_CODE
from tests.fault_tools import Api
from tests.processes import Stack, stop, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ENV = {"LDMSERVE_WATCHDOG_STALL_S": "3", "FAULT_SLOW_STEP_S": "600"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("faults-watchdog")
    with Stack(root, workers=0, env=ENV) as s:
        yield s


@pytest.fixture
def api(stack: Stack) -> Iterator[Api]:
    client = Api(stack.base)
    yield client
    client.close()
    for proc in list(stack.workers):
        stop(proc, signal.SIGKILL, 10)
        stack.retire(proc)


def _broken_worker_is_replaced(stack: Stack, api: Api, prompt: str, **fault: str) -> None:
    broken = stack.start_worker(**fault)
    stack.wait_workers(1)
    job = api.submit({"prompt": prompt, "steps": 3, "width": 64, "height": 64})
    wait_until(lambda: broken.poll() is not None, 180, "the watchdog to end the worker")
    assert broken.returncode == EXIT_CODE, stack.worker_logs()[-3000:]
    stack.retire(broken)
    view = api.view(job)
    assert view["status"] in ("running", "queued") and view["error"] is None, view
    stack.start_worker(FAULT_SLOW_STEP_S="0")
    done = api.wait_terminal([job], 240)[job]
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    assert "watchdog:" in stack.worker_logs()


def test_a_hung_step_ends_the_worker_and_the_job_moves_on(stack: Stack, api: Api) -> None:
    """A UNet call that never returns (600 s) while the stall limit is 3 s."""
    _broken_worker_is_replaced(stack, api, "slow:hung")


def test_a_broken_device_ends_the_worker_instead_of_failing_jobs(stack: Stack, api: Api) -> None:
    """Every UNet call raises a CUDA error: the job is not failed, the worker leaves."""
    _broken_worker_is_replaced(stack, api, "a cat", FAULT_DEVICE_BROKEN="1")


def test_a_job_past_the_runtime_limit_fails_and_the_worker_goes_on(stack: Stack, api: Api) -> None:
    """Steps of 0.5 s, 30 steps, limit 2 s: the job fails runtime_exceeded, the engine drops
    it, and the same worker (still alive) runs the next job."""
    worker = stack.start_worker(FAULT_SLOW_STEP_S="0.5", LDMSERVE_MAX_JOB_RUNTIME_S="2")
    stack.wait_workers(1)
    slow = api.submit({"prompt": "slow:long", "steps": 30, "width": 64, "height": 64})
    view = api.wait_terminal([slow], 120)[slow]
    assert view["status"] == "failed" and view["error"]["code"] == "runtime_exceeded", view
    fast = api.submit({"prompt": "a cat", "steps": 2, "width": 64, "height": 64})
    assert api.wait_terminal([fast], 120)[fast]["status"] == "succeeded"
    assert worker.poll() is None
