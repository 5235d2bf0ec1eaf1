"""Which pending jobs an engine lets into its batch, and when (service.engine.Engine).

Jobs wait here, in arrival order, until rows are free: FIFO, except that smaller jobs may pass
a head job too big for the free rows for a while (`backfill_limit` admissions), and a job whose
LoRA adapters are still being read off the step thread waits without holding others back. An
idle engine may also wait briefly for more jobs before starting the first (`gathering`), so
jobs submitted together share calls from their first step.

Not thread-safe by itself: the engine calls it under its own lock.
"""

from __future__ import annotations

import time
from collections import deque

from model.lora_library import PendingAdapters
from model.pipeline import Pipeline
from service.call_cost import CallCosts
from service.engine_types import JobHandle


class Admission:
    """The pending jobs of one engine (see the module docstring)."""

    def __init__(
        self, pipeline: Pipeline, max_batch: int, backfill_limit: int, wait_s: float
    ) -> None:
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.backfill_limit = backfill_limit  # admissions a too-big head lets smaller ones pass
        self.wait_s = wait_s  # bound on gathering jobs into an idle engine
        self.pending: deque[JobHandle] = deque()
        self._adapter_loads: dict[str, PendingAdapters] = {}  # pending jobs' LoRA reads
        self._head_waits = 0

    def add(self, handle: JobHandle) -> None:
        """Queue a submitted job (last in line)."""
        self.pending.append(handle)

    def rows(self) -> int:
        """Rows promised to pending jobs."""
        return sum(h.request.rows for h in self.pending)

    def remove(self, job_id: str) -> JobHandle | None:
        """Take a pending job out (canceled); None if it is not pending."""
        for handle in self.pending:
            if handle.id == job_id:
                self.pending.remove(handle)
                self._adapter_loads.pop(job_id, None)
                return handle
        return None

    def take_all(self) -> list[JobHandle]:
        """Every pending job, now the caller's (a graceful drain hands them back)."""
        handed_back = list(self.pending)
        self.pending.clear()
        self._adapter_loads.clear()
        return handed_back

    def reading_adapters(self) -> bool:
        """Whether some pending job waits only for its adapters to be read."""
        return bool(self._adapter_loads)

    def adapters_of(self, handle: JobHandle) -> PendingAdapters | None:
        """An admitted job's adapter read (None without adapters), no longer tracked here."""
        return self._adapter_loads.pop(handle.id, None)

    def gathering(self, active_rows: int, costs: CallCosts | None) -> float:
        """Seconds an idle engine should still wait for more jobs before starting the first
        (0: start now).

        Measured rule: only while what is pending fills less than the smallest call size
        within a few percent of the least time per row (CallCosts.efficient_rows), and for
        at most one call of what is pending (so a job waits no longer than one step would
        take), bounded by `wait_s`; jobs submitted at about the same time then share calls
        from their first step instead of the first one running ahead alone and the others
        stretching it."""
        if self.wait_s <= 0 or costs is None or not self.pending or active_rows > 0:
            return 0.0
        head = self.pending[0].request.params
        f = self.pipeline.vae_scale_factor
        pixels = (head.width or 0) // f * ((head.height or 0) // f)
        rows = self.rows()
        best = costs.efficient_rows(self.max_batch, pixels)
        if rows >= min(best, self.max_batch) or pixels <= 0:
            return 0.0
        wait = min(self.wait_s, costs.seconds(rows, pixels))
        waited = time.monotonic() - min(h.submitted_at for h in self.pending)
        return max(wait - waited, 0.0)

    def admit(self, free: int) -> list[JobHandle]:
        """FIFO into `free` rows; smaller jobs may pass a too-big head for a while. The
        admitted jobs leave the queue."""
        admitted: list[JobHandle] = []
        for i, handle in enumerate(list(self.pending)):
            if not self._adapters_ready(handle):
                continue  # its adapters are being read off the step thread; others go on
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
            self.pending.remove(handle)
        return admitted

    def _adapters_ready(self, handle: JobHandle) -> bool:
        """Whether a pending job's LoRA adapters are read (or failed to be); starts reading them
        on the library's loader thread the first time, so a large file never stalls a step."""
        loras = handle.request.params.loras
        if not loras:
            return True
        if handle.id not in self._adapter_loads:
            specs = [lo.model_dump() for lo in loras]
            load = self.pipeline.loras.prefetch(specs, allow_paths=False)
            self._adapter_loads[handle.id] = load
        return self._adapter_loads[handle.id].done()
