"""What a worker writes to Redis about its jobs: progress, live previews, finished results.

The engine's step thread hands each `StepOutput` to `Reporter.absorb`, which only records it;
the event loop then writes everything recorded in one `flush`: one round trip of progress
for all running jobs (which also tells which jobs were canceled or taken over: they are
dropped), the latest preview per job (best effort), and each ended job's images or error.
A write that fails (Redis away) keeps what it had for the next flush, and a finished job
stays in ``running`` until its result is stored, so nothing is lost while this worker's
heartbeat keeps the job its own.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from service.engine_types import JobHandle, JobState, Preview, Progress, StepOutput
from service.image_output import encode_images
from service.infotext import image_infotexts
from service.queue import Claim, WorkerQueue
from service.settings import Settings
from service.watchdog import Watchdog

log = logging.getLogger(__name__)


@dataclass
class Running:
    """A claimed job this worker holds: its claim, its engine handle, its encoded result."""

    claim: Claim
    handle: JobHandle | None = None
    encoded: list[bytes] | None = None  # result bytes, kept while storing them is retried


@dataclass
class _Events:
    """What the engine's step thread reported, not written yet."""

    progress: dict[str, Progress] = field(default_factory=dict)
    previews: dict[str, Preview] = field(default_factory=dict)  # the latest per job
    done: list[JobHandle] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)


class Reporter:
    """Records engine steps and writes them through the queue (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        queue: WorkerQueue,
        watchdog: Watchdog,
        running: dict[str, Running],
        encoder: ThreadPoolExecutor,
        drop: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.watchdog = watchdog
        self.running = running  # the worker's: a job leaves it once its outcome is written
        self.encoder = encoder  # PNG/JPEG encoding runs here, off the event loop
        self.drop = drop  # a job canceled or taken over elsewhere: stop running it
        self._events = _Events()

    def absorb(self, out: StepOutput) -> None:
        """Record one step's output (called from the engine's thread)."""
        ev = self._events
        for handle, progress in out.progress:
            ev.progress[handle.id] = progress
        for handle, preview in out.previews:
            ev.previews[handle.id] = preview
        ev.done.extend(out.ended)
        ev.batch_rows.extend(rows for rows, _ in out.calls)
        if out.calls or out.ended:
            self.watchdog.beat()  # the engine made progress (a stalled step never returns)

    async def flush(self) -> None:
        """One round trip of progress for all jobs; drop the lost ones; store finished ones."""
        ev = self._events
        progress, ev.progress = ev.progress, {}
        previews, ev.previews = ev.previews, {}
        done, ev.done = ev.done, []
        rows, ev.batch_rows = ev.batch_rows, []
        # A job's last progress arrives with its end (same engine step): still write it first,
        # so readers see step == total before the final status; canceled jobs get none.
        updates = [
            (self.running[j].claim, p.step, p.total, p.eta_s)
            for j, p in progress.items()
            if j in self.running and self.running[j].handle.state is not JobState.CANCELED  # type: ignore[union-attr]
        ]
        try:
            lost = await self.queue.progress_many(updates)
            if rows:
                await self.queue.record_batch(rows)
        except BaseException:
            for j, p in progress.items():  # keep them for the retry
                ev.progress.setdefault(j, p)
            ev.done[:0] = done
            raise
        await self._publish_previews(previews, skip=lost)
        for job_id in lost:
            log.info("job %s canceled or taken over: dropping it", job_id)
            self.drop(job_id)
        for i, handle in enumerate(done):
            try:
                await self._store(handle)
            except BaseException:
                ev.done[:0] = done[i:]  # not stored yet: retried with the next flush
                raise

    async def _publish_previews(self, previews: dict[str, Preview], skip: set[str]) -> None:
        """Live previews of running jobs; best effort (a lost one is replaced k steps later)."""
        items = []
        for job_id, preview in previews.items():
            entry = self.running.get(job_id)
            if entry is None or job_id in skip or entry.handle is None or entry.handle.done():
                continue
            h, w = preview.pixels.shape[:2]
            items.append(
                (
                    entry.claim,
                    {
                        "step": preview.step,
                        "total": preview.total,
                        "width": w,
                        "height": h,
                        "image": base64.b64encode(
                            encode_images([preview.pixels], "png")[0]
                        ).decode(),
                    },
                )
            )
        try:
            await self.queue.previews(items)
        except (RedisError, OSError) as exc:
            log.warning("publishing live previews failed: %s", exc)

    async def _store(self, handle: JobHandle) -> None:
        """Write a finished job's outcome. The job stays in ``running`` until the write went
        through: if Redis is away the caller retries, and the result is not dropped while
        this worker's heartbeat keeps anyone else from taking the job over."""
        entry = self.running.get(handle.id)
        if entry is None:
            return
        claim = entry.claim
        if handle.state is JobState.DONE:
            if entry.encoded is None:
                fmt = str(claim.params.get("output_format", "png"))
                loop = asyncio.get_running_loop()
                texts = None
                if self.settings.png_parameters:
                    texts = image_infotexts(claim.params, len(handle.images), claim.model)
                entry.encoded = await loop.run_in_executor(
                    self.encoder, encode_images, handle.images, fmt, texts
                )
            if await self.queue.finish(claim, entry.encoded):
                log.info("job %s succeeded (%d images)", claim.job_id, len(entry.encoded))
            else:
                log.info("job %s result discarded: no longer ours", claim.job_id)
        elif handle.state is JobState.FAILED:
            if self.watchdog.device_failed(handle.error):
                return  # not the job's fault: this process exits and the job is reclaimed
            await self.queue.fail(claim, "generation_failed", handle.error or "generation failed")
        # CANCELED: the queue already says so (or we handed it back while draining).
        self.running.pop(handle.id, None)
        if handle.state is not JobState.CANCELED and claim.params.get("inputs"):
            try:
                await self.queue.drop_inputs(claim.job_id)
            except (RedisError, OSError) as exc:  # left for the sweep (input_ttl_s)
                log.warning("could not delete job %s's input images: %s", claim.job_id, exc)
