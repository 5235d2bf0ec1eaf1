"""Step-level continuous batching over one model.Pipeline (no Redis, no HTTP).

Jobs join the running batch at the next UNet call and leave it when their last evaluation is
done, each with its own prompt, seed, step count, sampler and guidance scale. Samples whose
latents share a shape share UNet calls; one group per shape, stepped oldest-waiting first,
so an odd-sized job never blocks the rest and is never starved. A job's images depend only
on its own parameters: every sample carries its own trajectory, state and random generator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from model import samplers
from model.pipeline import GenerationError, Pipeline
from service.engine_types import (
    DoneCallback,
    GenerationRequest,
    JobHandle,
    JobState,
    Progress,
    ProgressCallback,
    Sample,
)
from service.prompt_cache import PromptCache

log = logging.getLogger(__name__)

BatchCallback = Callable[[int, int], None]  # (UNet rows, distinct jobs) per call
_OOM = (torch.OutOfMemoryError,)


class Engine:
    """Continuous-batching scheduler; `step()` runs one UNet call, `start()` drives it in a thread.

    `max_batch` counts UNet rows over all admitted samples (a guided sample takes two), so the
    memory a batch needs is bounded; a CUDA out-of-memory error splits the call and lowers the
    per-call row limit instead of failing jobs.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        max_batch: int = 16,
        *,
        prompt_cache_size: int = 512,
        backfill_limit: int = 8,
        on_batch: BatchCallback | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.call_rows = max_batch  # rows per UNet call; lowered after an out-of-memory error
        self.backfill_limit = backfill_limit  # calls a too-big head job lets smaller ones pass
        self.on_batch = on_batch
        self.prompts = PromptCache(pipeline, prompt_cache_size)
        self._cv = threading.Condition()
        self._pending: deque[JobHandle] = deque()
        self._cancel: set[str] = set()
        self._groups: dict[tuple[int, ...], list[Sample]] = {}
        self._last_stepped: dict[tuple[int, ...], int] = {}
        self._active_rows = 0
        self._running: set[str] = set()  # ids of admitted, unfinished jobs
        self._tick = 0
        self._head_waits = 0
        self._admitting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._delivery = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-deliver")
        self.calls = 0  # UNet calls made

    # ----------------------------------------------------------------- public, thread-safe
    def submit(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        on_done: DoneCallback | None = None,
    ) -> JobHandle:
        """Queue a job; it joins the batch at the next UNet call with room for it."""
        self.pipeline.latent_shape(request.width, request.height)  # GenerationError if bad
        if request.rows > self.max_batch:
            raise GenerationError(
                f"num_images={request.num_images} needs {request.rows} UNet rows; "
                f"this worker's max_batch is {self.max_batch}"
            )
        try:
            samplers.plan(request.sampler, request.steps, self.pipeline.schedule)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
        handle = JobHandle(request, on_progress, on_done)
        with self._cv:
            self._pending.append(handle)
            self._cv.notify_all()
        return handle

    def cancel(self, job_id: str) -> bool:
        """Cancel a job: pending ones at once, running ones before the next UNet call."""
        with self._cv:
            for handle in self._pending:
                if handle.id == job_id:
                    self._pending.remove(handle)
                    self._deliver(handle._finish, JobState.CANCELED)
                    return True
            if job_id in self._running:
                self._cancel.add(job_id)
                self._cv.notify_all()
                return True
        return False

    def free_rows(self) -> int:
        """Rows neither running nor promised to pending jobs: how much more a worker may claim."""
        with self._cv:
            return self.max_batch - self._active_rows - sum(h.request.rows for h in self._pending)

    def idle(self) -> bool:
        with self._cv:
            return not self._pending and self._active_rows == 0

    def close_admission(self) -> list[JobHandle]:
        """Stop admitting (graceful drain): return the pending jobs, now owned by the caller."""
        with self._cv:
            self._admitting = False
            handed_back = list(self._pending)
            self._pending.clear()
            return handed_back

    def flush_callbacks(self, timeout: float | None = 10.0) -> None:
        """Wait until every progress/done callback issued so far has run."""
        self._delivery.submit(lambda: None).result(timeout)

    def start(self) -> None:
        """Drive `step()` in a daemon thread until `stop()`."""
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._delivery.shutdown(wait=True)

    # ----------------------------------------------------------------- the denoising loop
    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    return
            try:
                worked = self.step()
            except Exception:  # a bug must not kill the driver; jobs in the group were failed
                log.exception("engine step failed")
                worked = True
            if not worked:
                with self._cv:
                    if not self._stopping and not self._pending and not self._cancel:
                        self._cv.wait(timeout=0.5)

    def step(self) -> bool:
        """Apply cancellations, admit pending jobs, run one UNet call. False when idle."""
        with self._cv:
            canceled, self._cancel = self._cancel, set()
        for job_id in canceled:
            self._drop(job_id, JobState.CANCELED)
        with self._cv:
            admitted = self._admit_locked() if self._admitting else []
        if admitted:
            self._start_samples(admitted)
        key = self._pick_group()
        if key is None:
            return False
        self._tick += 1
        self._last_stepped[key] = self._tick
        group = self._groups[key]
        try:
            outputs = self._unet(group)
        except Exception as exc:
            log.exception("UNet call failed for %d samples", len(group))
            for job in {s.job.id: s.job for s in group}.values():
                self._drop(
                    job.id, JobState.FAILED, f"UNet call failed: {type(exc).__name__}: {exc}"
                )
            return True
        new_states = samplers.advance([s.traj for s in group], [s.state for s in group], outputs)
        for sample, state in zip(group, new_states, strict=True):
            sample.state = state
        self._report_progress(group)
        self._retire_finished(key)
        return True

    def _admit_locked(self) -> list[JobHandle]:
        """FIFO admission into free rows; smaller jobs may pass a too-big head for a while."""
        free = self.max_batch - self._active_rows
        admitted: list[JobHandle] = []
        for i, handle in enumerate(list(self._pending)):
            rows = handle.request.rows
            if rows <= free:
                admitted.append(handle)
                free -= rows
                if i == 0:
                    self._head_waits = 0
            elif i == 0:
                self._head_waits += 1
                if self._head_waits > self.backfill_limit:
                    break  # stop backfilling until the head fits
        for handle in admitted:
            self._pending.remove(handle)
            self._active_rows += handle.request.rows
            self._running.add(handle.id)
        return admitted

    def _start_samples(self, handles: Sequence[JobHandle]) -> None:
        """Embed prompts (one batch for all new ones) and put each image into its shape group."""
        texts = [t for h in handles for t in (h.request.prompt, h.request.negative_prompt)]
        embeddings = iter(self.prompts.get_many(texts))
        for handle in handles:
            req = handle.request
            cond, uncond = next(embeddings), next(embeddings)
            traj = samplers.plan(req.sampler, req.steps, self.pipeline.schedule)
            shape = self.pipeline.latent_shape(req.width, req.height)
            handle.state = JobState.RUNNING
            handle.started_at = time.monotonic()
            for i in range(req.num_images):
                gen = torch.Generator("cpu").manual_seed(req.seed + i)
                state = samplers.start(traj, gen, shape, self.pipeline.device)
                sample = Sample(handle, i, traj, state, cond, uncond if req.guided else None)
                group = self._groups.setdefault(sample.shape_key, [])
                if not group:
                    self._last_stepped[sample.shape_key] = self._tick
                group.append(sample)

    def _pick_group(self) -> tuple[int, ...] | None:
        """The group waiting longest since its last UNet call (round robin over shapes)."""
        live = [k for k, g in self._groups.items() if g]
        if not live:
            return None
        return min(live, key=lambda k: self._last_stepped.get(k, 0))

    def _unet(self, group: list[Sample]) -> torch.Tensor:
        """Guided model outputs (n, C, h, w) for the group, split into calls of <= call_rows."""
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(group):
            chunk, rows = [], 0
            for sample in group[start:]:
                if chunk and rows + sample.rows > self.call_rows:
                    break
                chunk.append(sample)
                rows += sample.rows
            try:
                outputs.append(self._unet_call(chunk))
            except _OOM:
                if rows <= 1:
                    raise
                self.call_rows = max(1, rows // 2)
                log.warning(
                    "out of memory at %d UNet rows; calls now hold <= %d", rows, self.call_rows
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue  # retry this chunk, smaller
            start += len(chunk)
        return torch.cat(outputs)

    def _unet_call(self, chunk: list[Sample]) -> torch.Tensor:
        """One batched UNet call: conditional rows for all, unconditional rows for guided ones."""
        x_in, t = samplers.model_input([s.traj for s in chunk], [s.state for s in chunk])
        guided = [i for i, s in enumerate(chunk) if s.uncond is not None]
        cond = torch.cat([s.cond for s in chunk])  # (n, 77, D)
        if guided:
            idx = torch.tensor(guided)
            x = torch.cat([x_in, x_in[idx]])
            tt = torch.cat([t, t[idx]])
            ctx = torch.cat([cond, *[chunk[i].uncond for i in guided]])  # type: ignore[misc]
        else:
            x, tt, ctx = x_in, t, cond
        out = self.pipeline.unet_forward(x, tt, ctx)  # (n + g, C, h, w) float32
        self.calls += 1
        if self.on_batch is not None:
            self.on_batch(out.shape[0], len({s.job.id for s in chunk}))
        n = len(chunk)
        result = out[:n].clone()
        if guided:
            idx = torch.tensor(guided, device=out.device)
            scale = torch.tensor(
                [chunk[i].job.request.guidance_scale for i in guided], device=out.device
            )
            out_cond, out_uncond = out[:n][idx], out[n:]
            result[idx] = out_uncond + scale[:, None, None, None] * (out_cond - out_uncond)
        return result

    def _report_progress(self, group: list[Sample]) -> None:
        now = time.monotonic()
        for sample in group:
            if sample.index != 0:
                continue  # the images of one job move together: report once
            job, k, n = sample.job, sample.state.k, sample.traj.n_evals
            started = job.started_at or now
            eta = (now - started) / k * (n - k) if k else None
            self._deliver(job._report, Progress(k, n, eta))

    def _retire_finished(self, key: tuple[int, ...]) -> None:
        """Take finished jobs out of the batch at once, decode them together, hand them over."""
        group = self._groups[key]
        done_jobs = {s.job.id: s.job for s in group if s.finished}
        if not done_jobs:
            return
        finishing = [
            s
            for s in group
            if s.job.id in done_jobs and all(o.finished for o in group if o.job is s.job)
        ]
        ready = {s.job.id for s in finishing}
        self._groups[key] = [s for s in group if s.job.id not in ready]
        finishing.sort(key=lambda s: (s.job.id, s.index))
        try:
            pixels = self._decode(torch.cat([s.state.x for s in finishing]))
        except Exception as exc:
            log.exception("VAE decode failed")
            for job_id in ready:
                self._release(done_jobs[job_id])
                self._deliver(done_jobs[job_id]._finish, JobState.FAILED, f"decode failed: {exc}")
            return
        for job_id in ready:
            job = done_jobs[job_id]
            job.images = [pixels[i] for i, s in enumerate(finishing) if s.job is job]
            self._release(job)
            self._deliver(job._finish, JobState.DONE)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        while True:
            try:
                return self.pipeline.decode_latents(latents)
            except _OOM:
                if self.pipeline.decode_chunk <= 1:
                    raise
                self.pipeline.decode_chunk //= 2
                log.warning(
                    "out of memory decoding; VAE chunks now %d images", self.pipeline.decode_chunk
                )

    def _release(self, job: JobHandle) -> None:
        with self._cv:
            self._active_rows -= job.request.rows
            self._running.discard(job.id)

    def _drop(self, job_id: str, state: JobState, error: str | None = None) -> None:
        """Remove a running job's samples from every group and end it."""
        for key, group in self._groups.items():
            mine = [s for s in group if s.job.id == job_id]
            if mine:
                self._groups[key] = [s for s in group if s.job.id != job_id]
                job = mine[0].job
                self._release(job)
                self._deliver(job._finish, state, error)
                return

    def _deliver(self, fn: Callable[..., None], *args: object) -> None:
        """Run callbacks off the denoising thread, in order, so slow consumers never stall it."""
        self._delivery.submit(_guarded, fn, *args)


def _guarded(fn: Callable[..., None], *args: object) -> None:
    try:
        fn(*args)
    except Exception:  # a failing callback must not break delivery of the others
        log.exception("engine callback failed")
