"""Step-level continuous batching over one model.Pipeline (no Redis, no HTTP).

Jobs join the running batch at the next UNet call and leave it when their last evaluation is
done, each with its own prompt, seed, step count, sampler, guidance scale, mode (txt2img,
img2img, inpainting) and strength. Samples whose latents share a shape share UNet calls; one
group per shape, stepped oldest-waiting first, so an odd-sized job never blocks the rest and
is never starved. A job's images depend only on its own parameters: every sample carries its
own trajectory, state, conditioning and random generator, and every call goes through
`model.denoise.denoise_step`, the step `Pipeline.generate()` uses.

`step()` returns what happened (`StepOutput`: progress, ended jobs, UNet calls) to its
caller, which decides what to write where; nothing runs on a hidden thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.denoise import ConditioningCache, denoise_step
from model.generation_checks import MODEL_FIELDS, GenerationError
from model.lora_library import PendingAdapters
from model.pipeline import Pipeline
from model.preview import preview_pixels
from service.admission import Admission
from service.call_cost import CallCosts
from service.call_plan import CallPlanner, evaluations_left
from service.engine_types import (
    GenerationRequest,
    JobHandle,
    JobState,
    Preview,
    Progress,
    Sample,
    StepOutput,
)
from service.job_start import start_jobs
from service.prompt_cache import PromptCache

log = logging.getLogger(__name__)

_OOM = (torch.OutOfMemoryError,)
ADAPTER_POLL_S = 0.02  # an engine with nothing to step but adapter loads looks again this soon


class Engine:
    """Continuous-batching scheduler; each `step()` admits jobs and runs one group's UNet call.

    `max_batch` counts UNet rows over all admitted samples (a guided sample takes two), so the
    memory a batch needs is bounded; a CUDA out-of-memory error splits the call and lowers the
    per-call row limit (`call_rows`), which grows back after `grow_after` good calls. A job
    whose single image does not fit even alone fails with a clear error.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        max_batch: int = 16,
        *,
        prompt_cache_size: int = 512,
        backfill_limit: int = 8,
        grow_after: int = 32,
        call_costs: CallCosts | None = None,
        admission_wait_s: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.planner = CallPlanner(max_batch, call_costs, grow_after)  # rows per call
        self.prompts = PromptCache(pipeline, prompt_cache_size)
        self._lock = threading.Lock()
        self._admission = Admission(pipeline, max_batch, backfill_limit, admission_wait_s)
        self._cancel: set[str] = set()
        self._ended: list[JobHandle] = []  # ended outside step() (pending cancels)
        self._groups: dict[tuple[int, ...], list[Sample]] = {}
        self._conditioning = ConditioningCache()  # a call's batched text, reused while it lasts
        self._last_stepped: dict[tuple[int, ...], int] = {}
        self._active_rows = 0
        self._running: set[str] = set()  # ids of admitted, unfinished jobs
        self._tick = 0
        self._admitting = True
        self.calls = 0  # UNet calls made
        self._family = pipeline.capabilities.family  # picks the live previews' colour map

    @property
    def call_rows(self) -> int:
        """Rows a UNet call may hold now (lowered after an out-of-memory error)."""
        return self.planner.limit

    # ----------------------------------------------------------------- public, thread-safe
    def submit(self, request: GenerationRequest) -> JobHandle:
        """Queue a job; it joins the batch at the next step with room for it.

        Raises GenerationError (naming the parameter) for a job this model cannot run.
        """
        p = request.params
        width, height = self.pipeline.output_size(p.width, p.height, request.image)
        update: dict[str, Any] = {"width": width, "height": height}
        if not self.pipeline.takes_prompt:  # no text encoder, no CFG: one UNet row per image
            update["guidance_scale"] = min(p.guidance_scale, 1.0)
        if any(getattr(p, k) != v for k, v in update.items()):
            params = p.model_copy(update=update)
            request = dataclasses.replace(request, params=params)
        self.pipeline.check(
            width=width, height=height, steps=p.steps, sampler=p.sampler,
            num_images=p.num_images, image=request.image, mask=request.mask,
            strength=p.strength, clip_skip=p.clip_skip, prompt=p.prompt,
            **{name: getattr(p, name) for name in MODEL_FIELDS},
        )  # fmt: skip
        if request.rows > self.max_batch:
            raise GenerationError(
                f"num_images={p.num_images} needs {request.rows} UNet rows; "
                f"this worker's max_batch is {self.max_batch}",
                "num_images",
            )
        handle = JobHandle(request)
        with self._lock:
            self._admission.add(handle)
        return handle

    def cancel(self, job_id: str) -> bool:
        """Cancel a job: pending ones at once, running ones before the next UNet call.

        Either way the handle is returned as ended by the next `step()`."""
        with self._lock:
            handle = self._admission.remove(job_id)
            if handle is not None:
                handle.end(JobState.CANCELED)
                self._ended.append(handle)
                return True
            if job_id in self._running:
                self._cancel.add(job_id)
                return True
        return False

    def free_rows(self) -> int:
        """Rows neither running nor promised to pending jobs: how much more a worker may claim."""
        with self._lock:
            return self.max_batch - self._active_rows - self._admission.rows()

    def idle(self) -> bool:
        with self._lock:
            return not self._admission.pending and self._active_rows == 0 and not self._ended

    def close_admission(self) -> list[JobHandle]:
        """Stop admitting (graceful drain): return the pending jobs, now owned by the caller."""
        with self._lock:
            self._admitting = False
            return self._admission.take_all()

    def run_until_idle(self, limit: int = 100_000) -> list[StepOutput]:
        """Step until nothing is left (tests, benchmarks, `generate`-like batch use)."""
        outputs = []
        while len(outputs) < limit:
            out = self.step()
            if not out.worked and self.idle():
                return outputs
            if out.wait_s > 0:
                time.sleep(out.wait_s)  # admission is gathering jobs
            outputs.append(out)
        raise RuntimeError(f"engine still busy after {limit} steps")

    # ----------------------------------------------------------------- the denoising loop
    def step(self) -> StepOutput:
        """Apply cancellations, admit pending jobs, run one group's UNet call(s)."""
        out = StepOutput()
        with self._lock:
            canceled, self._cancel = self._cancel, set()
            out.ended.extend(self._ended)
            self._ended = []
            admitted = self._admit_locked(out) if self._admitting else []
        for job_id in canceled:
            self._drop(job_id, JobState.CANCELED, None, out)
        if admitted:
            self._start_samples(admitted, out)
        key = self._pick_group()
        if key is None:
            if self._admission.reading_adapters() and not out.wait_s:
                out.wait_s = ADAPTER_POLL_S  # only jobs whose adapters are being read
            return out
        self._tick += 1
        self._last_stepped[key] = self._tick
        advanced = self._advance(key, out)
        self._report_progress(advanced, out)
        self._retire_finished(key, out)
        return out

    def _admit_locked(self, out: StepOutput) -> list[JobHandle]:
        """Pending jobs into free rows (service.admission), unless an idle engine is still
        gathering them (then `out.wait_s` says for how long)."""
        out.wait_s = self._admission.gathering(self._active_rows, self.planner.costs)
        if out.wait_s > 0:
            return []
        admitted = self._admission.admit(self.max_batch - self._active_rows)
        for handle in admitted:
            self._active_rows += handle.request.rows
            self._running.add(handle.id)
        return admitted

    def _start_samples(self, handles: Sequence[JobHandle], out: StepOutput) -> None:
        """Start the admitted jobs (service.job_start) and put their samples in their groups;
        a job that cannot start fails and releases its rows."""

        def adapter_reads(handle: JobHandle) -> PendingAdapters | None:
            with self._lock:
                return self._admission.adapters_of(handle)

        def failed(handle: JobHandle, error: str) -> None:
            self._fail_unstarted(handle, error, out)

        for handle in start_jobs(self.pipeline, self.prompts, handles, adapter_reads, failed):
            handle.state = JobState.RUNNING
            handle.started_at = time.monotonic()
            for i, row in enumerate(handle.start.rows):  # type: ignore[union-attr]
                sample = Sample(handle, i, row)
                group = self._groups.setdefault(sample.shape_key, [])
                if not group:
                    self._last_stepped[sample.shape_key] = self._tick
                group.append(sample)

    def _fail_unstarted(self, handle: JobHandle, error: str, out: StepOutput) -> None:
        self._release(handle)
        handle.end(JobState.FAILED, error)
        out.ended.append(handle)

    def _pick_group(self) -> tuple[int, ...] | None:
        """The group waiting longest since its last UNet call (round robin over shapes)."""
        live = [k for k, g in self._groups.items() if g]
        if not live:
            return None
        return min(live, key=lambda k: self._last_stepped.get(k, 0))

    def _advance(self, key: tuple[int, ...], out: StepOutput) -> list[Sample]:
        """One evaluation for the samples of the group the planner selects
        (CallPlanner.select: all of them unless leaving some for later lowers the estimated
        mean latency), in calls of <= call_rows rows; returns the samples that took part.

        A call holds one text context length (prompts of different chunk counts never pad
        each other, so a job's image stays its solo image); within a length, samples closest
        to their end come first, so that calls hold jobs that leave together."""
        pixels = key[2] * key[3]
        group = self._groups[key]
        chosen = self.planner.select(group, pixels)
        if len(chosen) < len(group):
            picked = {id(s) for s in chosen}
            for sample in group:
                if id(sample) not in picked:
                    sample.waited += 1
        todo = sorted(chosen, key=lambda s: (s.context_length, evaluations_left(s)))
        advanced = list(todo)
        plan: list[int] = []
        while todo:
            if not plan:
                plan = self.planner.plan(todo, pixels)
            chunk = todo[: plan.pop(0)]
            rows = sum(s.rows for s in chunk)
            try:
                states = denoise_step(
                    self.pipeline.unet_forward, [s.row for s in chunk], self._conditioning
                )
            except _OOM:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(chunk) == 1:  # nothing smaller to try: this job cannot run here
                    job = chunk[0].job
                    log.warning("job %s: out of memory for one image alone", job.id)
                    self._drop(job.id, JobState.FAILED, self._oom_message(chunk[0]), out)
                    todo = [s for s in todo if s.job is not job]
                    plan = []
                    continue
                self.planner.out_of_memory(rows)
                plan = []
                continue  # retry this chunk, smaller
            except Exception as exc:
                log.exception("UNet call failed for %d samples", len(chunk))
                failed = {s.job.id for s in chunk}
                for job_id in failed:
                    msg = f"UNet call failed: {type(exc).__name__}: {exc}"
                    self._drop(job_id, JobState.FAILED, msg, out)
                todo = [s for s in todo if s.job.id not in failed]
                plan = []
                continue
            for sample, state in zip(chunk, states, strict=True):
                sample.row.state = state
            self.calls += 1
            out.calls.append((rows, len({s.job.id for s in chunk})))
            self.planner.succeeded()
            todo = todo[len(chunk) :]
        return [s for s in advanced if s.job.state is JobState.RUNNING]

    def _oom_message(self, sample: Sample) -> str:
        p = sample.job.request.params
        return (
            f"out of memory: one {p.width}x{p.height} image ({sample.rows} UNet rows) does not "
            "fit on this worker's device even alone; use a smaller size"
        )

    def _report_progress(self, group: list[Sample], out: StepOutput) -> None:
        now = time.monotonic()
        for sample in group:
            if sample.index != 0:
                continue  # the images of one job move together: report once
            job, k, n = sample.job, sample.row.state.k, sample.row.traj.n_evals
            started = job.started_at or now
            eta = (now - started) / k * (n - k) if k else None
            job.progress = Progress(k, n, eta)
            out.progress.append((job, job.progress))
            every = job.request.preview_every
            if every > 0 and 0 < k < n and k % every == 0:
                a, b = sample.row.traj.noise_ab[k]
                pixels = preview_pixels(sample.row.state.x, self._family, a, b)
                out.previews.append((job, Preview(k, n, pixels)))

    def _retire_finished(self, key: tuple[int, ...], out: StepOutput) -> None:
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
            pixels = self._decode(torch.cat([s.row.state.x for s in finishing]))
        except Exception as exc:
            log.exception("VAE decode failed")
            for job_id in ready:
                job = done_jobs[job_id]
                self._release(job)
                job.end(JobState.FAILED, f"decode failed: {type(exc).__name__}: {exc}")
                out.ended.append(job)
            return
        for job_id in ready:
            job = done_jobs[job_id]
            mine = np.stack([pixels[i] for i, s in enumerate(finishing) if s.job is job])
            job.images = list(self.pipeline.finish(job.start, mine))  # type: ignore[arg-type]
            self._release(job)
            job.end(JobState.DONE)
            out.ended.append(job)

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
        with self._lock:
            self._active_rows -= job.request.rows
            self._running.discard(job.id)

    def _drop(self, job_id: str, state: JobState, error: str | None, out: StepOutput) -> None:
        """Remove a running job's samples from every group and end it."""
        job = None
        for key, group in self._groups.items():
            mine = [s for s in group if s.job.id == job_id]
            if mine:
                self._groups[key] = [s for s in group if s.job.id != job_id]
                job = mine[0].job
        if job is not None:
            self._release(job)
            job.end(state, error)
            out.ended.append(job)
