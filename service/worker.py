"""The worker process: Redis queue ⇄ continuous-batching engine, heartbeats, graceful drain.

One worker per GPU. It loads the model once, warms it up, heart-beats, claims only as many
jobs as the engine has free rows, feeds them into the engine, stores finished images and
acks through the queue's guarded writes (service.worker_reports). Cancellations and take-overs are noticed on every
progress write (one Redis round trip per UNet step for the whole batch) and the job is
dropped before the next step. SIGTERM stops claiming, lets running jobs finish within the
drain timeout, hands the rest back and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Literal

from redis.exceptions import RedisError

from model.capabilities import describe
from model.pipeline import GenerationError, Pipeline
from service.api_errors import ApiError
from service.call_cost import CallCosts
from service.contract import GENERATION_FIELDS, IMAGE_FIELDS, GenerationParams
from service.engine import Engine
from service.engine_types import (
    GenerationRequest,
    StepOutput,
)
from service.image_input import decode_image
from service.queue import Claim, WorkerInfo, WorkerQueue, new_worker_id
from service.settings import Settings
from service.watchdog import Watchdog
from service.worker_reports import Reporter, Running

log = logging.getLogger(__name__)
_MODES: dict[str, Literal["RGB", "L"]] = {"image": "RGB", "mask": "L"}


def request_from_claim(
    claim: Claim, inputs: dict[str, bytes], settings: Settings
) -> GenerationRequest:
    """The engine's request for a claimed job: its parameters through the contract, its input
    images (PNG files the API wrote with ``decode_image``) decoded the same checked way."""
    p = claim.params
    params = GenerationParams(
        **{k: p[k] for k in GENERATION_FIELDS if k in p and k not in IMAGE_FIELDS}
    )
    wanted = p.get("inputs") or []
    missing = [name for name in wanted if name not in inputs]
    if missing:
        raise ValueError(f"the job's {', '.join(missing)} expired or was lost")
    images = {
        name: decode_image(inputs[name], field=name, settings=settings, mode=_MODES[name])
        for name in wanted
    }
    every = settings.preview_every_steps if p.get("preview") else 0
    return GenerationRequest(
        claim.job_id, params, images.get("image"), images.get("mask"), preview_every=every
    )


class Worker:
    """Runs until stopped; `run()` is the whole life of a worker process."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        model_name: str | None = None,
        call_costs: CallCosts | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.model_name = model_name or settings.model
        self.worker_id = new_worker_id()
        self.engine = Engine(
            pipeline,
            settings.max_batch,
            call_costs=call_costs,
            admission_wait_s=settings.admission_wait_s,
        )
        self.queue = WorkerQueue.connect(settings)
        self.watchdog = Watchdog(
            settings, self.queue, self.worker_id, self._busy, self.engine.cancel
        )
        self.running: dict[str, Running] = {}
        # A job on its last attempt after crashing workers runs alone (see _claim_loop);
        # normally at most one is held here, more only while Redis is away.
        self._deferred: deque[Claim] = deque()
        self._isolated: str | None = None
        self._wake = asyncio.Event()
        self._work = asyncio.Event()  # the engine has something new (a job or a cancel)
        self._stop = asyncio.Event()
        self._closed = asyncio.Event()  # the loops end by this flag, not by cancellation:
        # redis-py can swallow a cancel that lands inside a command (as a timeout error)
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
        self._stepper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.reports = Reporter(
            settings, self.queue, self.watchdog, self.running, self._encoder, self._drop
        )
        self.info = WorkerInfo(
            worker_id=self.worker_id,
            model=self.model_name,
            max_batch=settings.max_batch,
            device=str(pipeline.device),
            started_at=time.time(),
            capabilities=pipeline.capabilities.to_dict(),
        )

    # ----------------------------------------------------------------- the engine
    async def _engine_loop(self) -> None:
        """Run engine steps on their own thread; turn what each returns into Redis writes."""
        loop = asyncio.get_running_loop()
        while not self._closed.is_set():
            self._work.clear()
            try:
                out = await loop.run_in_executor(self._stepper, self.engine.step)
            except Exception:  # a bug must not kill the loop; the step's jobs were failed
                log.exception("engine step failed")
                out = StepOutput()
            self.reports.absorb(out)
            if out.worked:
                self._wake.set()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._work.wait(), min(0.5, out.wait_s or 0.5))

    # ----------------------------------------------------------------- lifecycle
    def request_stop(self) -> None:
        """Graceful drain (SIGTERM / Ctrl-C)."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        log.info("worker %s serving %r (max_batch %d rows)", self.worker_id, self.model_name,
                 self.settings.max_batch)  # fmt: skip
        engine = asyncio.create_task(self._engine_loop())
        tasks = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._events_loop()),
        ]
        watchdog = asyncio.create_task(self.watchdog.run())  # no Redis wait: cancel works
        try:
            await self._claim_loop()
            await self._drain()
        finally:
            watchdog.cancel()
            self._closed.set()
            self._work.set()
            self._wake.set()
            await asyncio.gather(engine, *tasks, watchdog, return_exceptions=True)
            await self.reports.flush()
            self._stepper.shutdown(wait=True)
            self._encoder.shutdown(wait=True)
            try:
                await self.queue.unregister(self.worker_id)
            except RedisError as exc:
                log.warning("could not unregister: %s", exc)
            await self.queue.aclose()
            log.info("worker %s stopped", self.worker_id)

    def _busy(self) -> dict[str, Claim]:
        """The claims the engine is working on (for the watchdog)."""
        return {j: e.claim for j, e in self.running.items() if e.handle and not e.handle.done()}

    async def _heartbeat_loop(self) -> None:
        while not self._closed.is_set():
            # adapters added to (or removed from) the LoRA directory are published as they come
            caps = describe(self.pipeline).to_dict()
            if caps != self.info.capabilities:
                self.info = replace(self.info, capabilities=caps)
            try:
                await self.queue.heartbeat(self.info)
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed (Redis away?): %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.settings.heartbeat_interval_s)

    async def _claim_loop(self) -> None:
        """Take jobs while there is room: dead workers' first, then new ones.

        Poison isolation: a reclaimed job on its last attempt (it was running on workers that
        died ``max_attempts - 1`` times) runs alone. The worker lets its current jobs finish,
        runs it with nothing else, and claims nothing meanwhile; if it is a poison job that
        crashes the process again, it fails without taking other jobs' attempts with it,
        and jobs that were merely batched with it get a clean last try.
        """
        await self._beat_until_up()
        prune_every, last_prune = 60.0, 0.0
        while not self._stop.is_set():
            if self._deferred:
                if self.running:
                    await self._sleep(0.05)
                    continue
                claim = self._deferred.popleft()
                self._isolated = claim.job_id
                log.info("job %s runs alone: its last attempt", claim.job_id)
                await self._start(claim)
                continue
            if self._isolated is not None:
                if self._isolated in self.running:
                    await self._sleep(0.05)
                    continue
                self._isolated = None
            free = self.engine.free_rows()
            if free <= 0:
                await self._sleep(0.05)
                continue
            count = max(1, free // 2)  # a typical guided image takes two rows
            try:
                claims = await self.queue.reclaim(self.worker_id, self.model_name, count)
                if not claims:
                    block = 200 if self.running else 1000
                    claims = await self.queue.claim(self.worker_id, self.model_name, count, block)
                if time.monotonic() - last_prune > prune_every:
                    last_prune = time.monotonic()
                    await self.queue.prune_consumers(self.model_name)
                    await self.queue.expire_results()
            except (RedisError, OSError) as exc:
                log.warning("claiming failed (Redis away?): %s; retrying", exc)
                await self._sleep(1.0)
                continue
            for claim in claims:
                if not self._last_chance(claim):
                    await self._start(claim)
                elif not self._deferred:
                    self._deferred.append(claim)
                else:
                    await self._hand_back_last_chance(claim)

    async def _hand_back_last_chance(self, claim: Claim) -> None:
        """Hold one last-attempt job at a time: if it crashes the process, a second one held
        here would lose its last attempt too. The others go back (not counted as attempts)
        for any worker to take; only if Redis is away are they kept, to run alone in turn."""
        try:
            if await self.queue.release(claim):
                log.info("job %s handed back: one last-attempt job at a time", claim.job_id)
        except (RedisError, OSError) as exc:
            log.warning("could not hand back job %s (%s); it waits here", claim.job_id, exc)
            self._deferred.append(claim)

    def _last_chance(self, claim: Claim) -> bool:
        """A retried job with no attempt left after this one."""
        return claim.attempt > 1 and claim.attempt >= self.settings.max_attempts

    async def _beat_until_up(self) -> None:
        """The first heartbeat, retried while Redis is unreachable (or until stopped)."""
        while not self._stop.is_set():
            try:
                await self.queue.heartbeat(self.info)
                return
            except (RedisError, OSError) as exc:
                log.warning("first heartbeat failed (Redis away?): %s; retrying", exc)
                await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):  # builtin TimeoutError only from 3.11
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _start(self, claim: Claim) -> None:
        log.info("job %s claimed (attempt %d)", claim.job_id, claim.attempt)
        try:
            inputs = await self.queue.inputs(claim.job_id) if claim.params.get("inputs") else {}
            loop = asyncio.get_running_loop()  # decoding images is CPU work: off the loop
            request = await loop.run_in_executor(
                self._encoder, request_from_claim, claim, inputs, self.settings
            )
            handle = self.engine.submit(request)
        except (GenerationError, ApiError, TypeError, ValueError) as exc:
            log.warning("job %s refused: %s", claim.job_id, exc)
            await self.queue.fail(claim, "invalid_request", str(exc))
            return
        self.running[claim.job_id] = Running(claim, handle)
        self._work.set()

    def _drop(self, job_id: str) -> None:
        """Stop running a job canceled or taken over elsewhere (before the next step)."""
        self.engine.cancel(job_id)
        self._work.set()

    async def _events_loop(self) -> None:
        while not self._closed.is_set():
            await self._wake.wait()
            self._wake.clear()
            if self._closed.is_set():
                return  # run() flushes once more after the engine has stopped
            try:
                await self.reports.flush()
            except (RedisError, OSError) as exc:
                log.warning("reporting to Redis failed: %s; retrying", exc)
                await asyncio.sleep(0.5)
                self._wake.set()

    async def _drain(self) -> None:
        """Stop claiming; finish running jobs within the drain timeout; hand back the rest."""
        while self._deferred:  # last-attempt jobs not started yet
            await self.queue.release(self._deferred.popleft())
        pending = self.engine.close_admission()
        for handle in pending:
            entry = self.running.pop(handle.id, None)
            if entry is not None:
                await self.queue.release(entry.claim)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        log.info(
            "draining %d running jobs (up to %.0fs)",
            len(self.running),
            self.settings.drain_timeout_s,
        )
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job_id, entry in list(self.running.items()):
            self.engine.cancel(job_id)
            self._work.set()
            self.running.pop(job_id, None)
            await self.queue.release(entry.claim)
            log.info("job %s handed back", job_id)


def install_signal_handlers(worker: Worker) -> None:
    """SIGTERM and SIGINT drain the worker."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)


async def serve(
    settings: Settings,
    pipeline: Pipeline,
    model_name: str | None = None,
    call_costs: CallCosts | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT."""
    worker = Worker(settings, pipeline, model_name, call_costs)
    install_signal_handlers(worker)
    await worker.run()
