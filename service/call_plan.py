"""How the engine cuts one step of a group into UNet calls: per run of one text context length
(prompts of different chunk counts never pad each other), the measured cheapest split
(service.call_cost.CallCosts.split) or, without costs, calls filled greedily; every call at
most `limit` rows — the worker's `max_batch`, halved after an out-of-memory error and doubled
back after a run of good calls (memory frees up as other work leaves the device).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from service.call_cost import CallCosts
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
