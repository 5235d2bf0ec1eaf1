"""Which samples of a group a step advances (`select`) and how it cuts them into UNet calls
(`plan`): per run of one text context length
(prompts of different chunk counts never pad each other), the measured cheapest split
(service.call_cost.CallCosts.split) or, without costs, calls filled greedily; every call at
most `limit` rows — the worker's `max_batch`, halved after an out-of-memory error and doubled
back after a run of good calls (memory frees up as other work leaves the device).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence

from service.call_cost import CallCosts
from service.engine_types import Sample

log = logging.getLogger(__name__)


def evaluations_left(sample: Sample) -> int:
    """UNet evaluations a sample still needs."""
    return sample.row.traj.n_evals - sample.row.state.k


@functools.lru_cache(maxsize=4096)
def _split_seconds(costs: CallCosts, rows: tuple[int, ...], pixels: int, limit: int) -> float:
    """`CallCosts.split_seconds`, remembered: the same compositions recur step after step."""
    return costs.split_seconds(rows, pixels, limit)


class CallPlanner:
    """The call sizes of one engine."""

    def __init__(self, max_batch: int, costs: CallCosts | None, grow_after: int) -> None:
        self.max_batch = max_batch
        self.costs = costs  # None: calls as large as `limit` allows
        self.grow_after = grow_after  # good calls before a lowered limit doubles again
        self.limit = max_batch  # rows per UNet call
        self._good_calls = 0

    def select(self, group: Sequence[Sample], pixels: int) -> list[Sample]:
        """The samples to advance this step: whole jobs, the ones closest to their end first
        (fewest remaining evaluations less the steps they have waited: aging, so no job
        starves), as many as gives the least estimated sum of completion times. Each
        candidate (the first k jobs now, the rest after them; k = all: every job in every
        step) is played forward with the measured costs (`_completions`). Where rows are
        nearly free (a GPU) sharing calls wins and the whole group runs; where time grows
        about linearly with rows (a CPU) running everything together only stretches the
        short jobs over the long ones' rows, and they go first. Without costs, all."""
        if self.costs is None:
            return list(group)
        jobs: dict[str, list[Sample]] = {}
        for sample in group:
            jobs.setdefault(sample.job.id, []).append(sample)
        if len(jobs) == 1:
            return list(group)

        def priority(samples: list[Sample]) -> tuple[int, float]:
            first = samples[0]
            return evaluations_left(first) - first.waited, first.job.submitted_at

        ordered = sorted(jobs.values(), key=priority)
        work = [
            (evaluations_left(samples[0]), tuple(s.rows for s in samples)) for samples in ordered
        ]
        best_k, best = len(work), self._completions(work, pixels, 0.0)[1]
        head_rows = 0
        for k in range(1, len(work)):
            head_rows += sum(work[k - 1][1])
            if head_rows > self.limit:
                break
            end, first = self._completions(work[:k], pixels, 0.0)
            total = first + self._completions(work[k:], pixels, end)[1]
            if total < best * (1 - 1e-6):
                best_k, best = k, total
        return [s for samples in ordered[:best_k] for s in samples]

    def _completions(
        self, work: Sequence[tuple[int, tuple[int, ...]]], pixels: int, start: float
    ) -> tuple[float, float]:
        """(end time, sum of completion times) of jobs (remaining evaluations, rows of each
        sample) all advanced every step from `start`, each step costing its best split."""
        assert self.costs is not None
        left = sorted(work, key=lambda w: w[0])
        now, done, total, i = start, 0, 0.0, 0
        while i < len(left):
            rows = [r for _, sample_rows in left[i:] for r in sample_rows]
            step = _split_seconds(self.costs, tuple(rows), pixels, self.limit)
            now += (left[i][0] - done) * step
            done = left[i][0]
            while i < len(left) and left[i][0] == done:
                total += now
                i += 1
        return now, total

    def plan(self, todo: Sequence[Sample], pixels: int) -> list[int]:
        """Samples per call, in `todo`'s order (sorted by context length by the caller)."""
        counts: list[int] = []
        for _, run in itertools.groupby(todo, key=lambda s: s.context_length):
            rows = [s.rows for s in run]
            if self.costs is not None:
                counts += self.costs.split(rows, pixels, self.limit)
                continue
            size = self.limit + 1
            for r in rows:
                if size + r <= self.limit:
                    counts[-1] += 1
                    size += r
                else:
                    counts.append(1)
                    size = r
        return counts

    def out_of_memory(self, rows: int) -> None:
        """A call of `rows` rows ran out of memory: calls hold at most half of it from now."""
        self.limit = max(1, min(self.limit, rows) // 2)
        self._good_calls = 0
        log.warning("out of memory at %d UNet rows; calls now hold <= %d", rows, self.limit)

    def succeeded(self) -> None:
        """After a run of good calls, let a lowered limit grow back."""
        if self.limit >= self.max_batch:
            return
        self._good_calls += 1
        if self._good_calls >= self.grow_after:
            self.limit = min(self.max_batch, self.limit * 2)
            self._good_calls = 0
            log.info("UNet calls may hold %d rows again", self.limit)
