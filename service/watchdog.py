"""The worker's watchdog: a worker that can no longer run jobs must stop claiming to be alive.

A hung UNet step or a broken device (a non-OOM CUDA error: once a CUDA context has seen an
illegal access every later call fails) leaves the process heart-beating while it stalls or
fails every job it takes. The watchdog notices both and ends the process at once with
:data:`EXIT_CODE`; its heartbeat expires within ``worker_ttl_s``, then its jobs are
reclaimed by other workers (:meth:`~service.queue.worker_side.WorkerQueue.reclaim`; the
run counts as an attempt) and the orchestrator restarts it. ``os._exit``, because a thread
stuck inside a CUDA call cannot be joined and a graceful shutdown would wait on it forever;
and no last Redis call (deleting the heartbeat), because while it is in flight the claim
loop could reclaim the very jobs this process is abandoning.

It also enforces ``max_job_runtime_s``: a job running longer fails with the error code
:data:`RUNTIME_EXCEEDED` and is dropped from the engine.

The worker feeds it: :meth:`Watchdog.beat` from the engine's callbacks (any thread),
:meth:`Watchdog.device_failed` for each failed job's error, and ``jobs()`` (the claims the
engine is working on) for the checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping

from redis.exceptions import RedisError

from service.queue import Claim, WorkerQueue
from service.settings import Settings

log = logging.getLogger(__name__)

EXIT_CODE = 70  # EX_SOFTWARE: the orchestrator restarts the worker
RUNTIME_EXCEEDED = "runtime_exceeded"

# Messages of device failures after which the CUDA context is unusable. Out-of-memory is
# not one: the engine splits the batch and retries.
_DEVICE_ERROR = re.compile(r"CUDA|AcceleratorError|cuDNN|CUBLAS|NCCL|device-side assert")
_OOM = re.compile(r"out of memory", re.IGNORECASE)


def is_device_failure(message: str | None) -> bool:
    """Whether a job's error says the device itself broke (not OOM, not a bad request)."""
    return (
        bool(message)
        and bool(_DEVICE_ERROR.search(message or ""))
        and not _OOM.search(message or "")
    )


class Watchdog:
    """Stall, device-failure and run-time checks for one worker (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        queue: WorkerQueue,
        worker_id: str,
        jobs: Callable[[], Mapping[str, Claim]],
        cancel: Callable[[str], object],
        exit_process: Callable[[int], object] = os._exit,
    ) -> None:
        self.stall_s = settings.watchdog_stall_s
        self.max_runtime_s = settings.max_job_runtime_s
        self.queue = queue
        self.worker_id = worker_id
        self.jobs = jobs
        self.cancel = cancel
        self.exit_process = exit_process
        self.tripped: str | None = None
        self._lock = threading.Lock()
        self._last_progress = time.monotonic()
        self._had_work = False
        self._first_seen: dict[str, float] = {}

    @property
    def interval_s(self) -> float:
        """How often :meth:`run` checks: a tenth of the shortest limit, at most 1 s."""
        limits = [x for x in (self.stall_s, self.max_runtime_s) if x > 0]
        return min([1.0, *(x / 10 for x in limits)])

    def beat(self) -> None:
        """The engine made progress (a UNet call, a finished job); thread-safe."""
        with self._lock:
            self._last_progress = time.monotonic()

    def device_failed(self, error: str | None) -> bool:
        """Whether a failed job's ``error`` is a device failure; if so the watchdog trips and
        the caller must not record the failure (the job is not at fault: it is reclaimed)."""
        if not is_device_failure(error):
            return False
        self._trip(f"device failure: {error}")
        return True

    def stalled(self, now: float) -> bool:
        """No progress for ``watchdog_stall_s`` while the engine has work (0 = never)."""
        busy = bool(self.jobs())
        with self._lock:
            if busy and not self._had_work:
                self._last_progress = now  # idle time before the work came does not count
            self._had_work = busy
            return busy and self.stall_s > 0 and now - self._last_progress > self.stall_s

    def overdue(self, now: float) -> list[Claim]:
        """Claims running longer than ``max_job_runtime_s`` (0 = no limit)."""
        jobs = self.jobs()
        self._first_seen = {j: self._first_seen.get(j, now) for j in jobs}
        if self.max_runtime_s <= 0:
            return []
        return [c for j, c in jobs.items() if now - self._first_seen[j] > self.max_runtime_s]

    async def run(self) -> None:
        """Check every :attr:`interval_s` until cancelled; exits the process when tripped."""
        while self.tripped is None:
            await self.check(time.monotonic())
            await asyncio.sleep(self.interval_s)

    async def check(self, now: float) -> None:
        """One round: trip on a stall, fail jobs past their run-time limit."""
        if self.tripped is None and self.stalled(now):
            self._trip(f"no engine progress for {self.stall_s:g}s with jobs running")
        if self.tripped is None:
            for claim in self.overdue(now):
                await self._fail_overdue(claim)

    def _trip(self, reason: str) -> None:
        """Log why and end the process now (no await: nothing else runs in between)."""
        if self.tripped is not None:
            return
        self.tripped = reason
        log.error("watchdog: %s; worker %s exits for a restart", reason, self.worker_id)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self.exit_process(EXIT_CODE)

    async def _fail_overdue(self, claim: Claim) -> None:
        message = f"the job ran longer than max_job_runtime_s ({self.max_runtime_s:g}s)"
        try:
            failed = await self.queue.fail(claim, RUNTIME_EXCEEDED, message)
        except (RedisError, OSError) as exc:
            log.warning("could not fail overdue job %s: %s", claim.job_id, exc)
            return
        if failed:
            log.warning("job %s failed: %s", claim.job_id, message)
        self.cancel(claim.job_id)
        self._first_seen.pop(claim.job_id, None)
