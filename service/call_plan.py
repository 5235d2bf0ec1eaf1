"""Which samples of a group a step advances (`select`) and how it cuts them into UNet calls
(`plan`): per run of one text context length
(prompts of different chunk counts never pad each other), the measured cheapest split
(service.call_cost.CallCosts.split) or, without costs, calls filled greedily; every call at
most `limit` rows — the worker's `max_batch`, halved after an out-of-memory error and doubled
back after a run of good calls (memory frees up as other work leaves the device).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from service.call_cost import EFFICIENT_WITHIN, CallCosts
from service.engine_types import Sample

log = logging.getLogger(__name__)


class CallPlanner:
    """The call sizes of one engine."""

    def __init__(self, max_batch: int, costs: CallCosts | None, grow_after: int) -> None:
        self.max_batch = max_batch
        self.costs = costs  # None: calls as large as `limit` allows
        self.grow_after = grow_after  # good calls before a lowered limit doubles again
        self.limit = max_batch  # rows per UNet call
        self._good_calls = 0

    def select(self, group: Sequence[Sample], pixels: int) -> list[Sample]:
        """The samples to advance this step: all of them, unless costs say that a smaller
        call loses little. Then whole jobs, by fewest remaining evaluations less the steps
        they have waited (aging: no job starves), until the next would overfill the smallest
        efficient call (`CallCosts.efficient_rows`; one job at least), provided that this
        call and the rest's calls are estimated within `EFFICIENT_WITHIN` of the time of
        the whole group's best split. With time about linear in rows (a CPU), the jobs
        closest to their end then finish first instead of every job being stretched over
        all the rows (shortest remaining first minimises mean latency); where rows are
        nearly free (a GPU), the whole group still shares its calls."""
        if self.costs is None:
            return list(group)
        target = self.costs.efficient_rows(self.limit, pixels)
        if sum(s.rows for s in group) <= target:
            return list(group)
        jobs: dict[str, list[Sample]] = {}
        for sample in group:
            jobs.setdefault(sample.job.id, []).append(sample)

        def priority(samples: list[Sample]) -> tuple[int, float]:
            first = samples[0]
            left = first.row.traj.n_evals - first.row.state.k
            return left - first.waited, first.job.submitted_at

        chosen: list[Sample] = []
        rows = 0
        for samples in sorted(jobs.values(), key=priority):
            need = sum(s.rows for s in samples)
            if chosen and rows + need > target:
                break
            chosen += samples
            rows += need
        picked = {id(s) for s in chosen}
        rest = [s.rows for s in group if id(s) not in picked]
        if not rest:
            return chosen
        split = self.costs.split_seconds
        whole = split([s.rows for s in group], pixels, self.limit)
        apart = split([s.rows for s in chosen], pixels, self.limit) + split(
            rest, pixels, self.limit
        )
        return chosen if apart <= whole * (1 + EFFICIENT_WITHIN) else list(group)

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
