"""What any step schedule could reach on a burst, given the measured call costs.

A burst of jobs (all arriving at once, one latent size) is served by UNet steps; each step
advances some of the unfinished jobs by one evaluation, at a cost that depends only on the
rows it carries (the worker's measured curve). Every schedule — which jobs each step advances
— has a wall time (the sum of its steps' seconds) and a sum of completion times (each step's
seconds times the jobs still unfinished when it runs). `pareto` searches all of them
exhaustively (jobs with the same remaining evaluations and rows are interchangeable, so a step
chooses how many of each kind) and returns the trade-off curve. Static batching's schedule
(`groups_in_turn`) is one of them, so the curve shows, on this machine's costs, how much
mean latency can be bought at no extra wall time — the bound the engine's scheduler works
against. Text encoding and decoding are left out: each job costs the same there either way.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable, Sequence

Work = tuple[int, int]  # (evaluations left, rows per evaluation) of one job
Point = tuple[float, float]  # (wall seconds, sum of completion times)

MAX_JOBS = 12
"""Beyond this the exhaustive search gets slow (classes × counts per step); not computed."""


def pareto(jobs: Sequence[Work], step_seconds: Callable[[int], float]) -> list[Point]:
    """Every (wall, sum of completion times) no other schedule beats on both, wall
    increasing. `step_seconds(rows)`: the cost of one step carrying that many rows."""
    if len(jobs) > MAX_JOBS:
        raise ValueError(f"at most {MAX_JOBS} jobs, got {len(jobs)}")

    @functools.cache
    def best(state: tuple[tuple[Work, int], ...]) -> tuple[Point, ...]:
        if not state:
            return ((0.0, 0.0),)
        live = sum(n for _, n in state)
        options: list[Point] = []
        for take in itertools.product(*(range(n + 1) for _, n in state)):
            rows = sum(k * work[1] for (work, _), k in zip(state, take, strict=True))
            if rows == 0:
                continue
            cost = step_seconds(rows)
            after: Counter[Work] = Counter()
            for (work, n), k in zip(state, take, strict=True):
                left, r = work
                if n - k:
                    after[work] += n - k
                if k and left > 1:
                    after[(left - 1, r)] += k
            for wall, total in best(tuple(sorted(after.items()))):
                options.append((wall + cost, total + cost * live))
        return tuple(_front(options))

    return list(best(tuple(sorted(Counter(jobs).items()))))


def _front(points: list[Point]) -> list[Point]:
    """The points not beaten on both coordinates, wall increasing (walls within rounding of
    each other count as equal: sums of the same step costs in another order)."""
    out: list[Point] = []
    for wall, total in sorted(points):
        if out and wall <= out[-1][0] + 1e-9:
            if total < out[-1][1]:
                out[-1] = (out[-1][0], total)
        elif not out or total < out[-1][1] - 1e-9:
            out.append((wall, total))
    return out


def groups_in_turn(groups: Sequence[Sequence[Work]], call_seconds: Callable[[int], float]) -> Point:
    """Static batching's schedule: each group of jobs as one call per step, one group after
    another in the given order (all arrived at once)."""
    now = total = 0.0
    for group in groups:
        steps = max(left for left, _ in group)
        now += steps * call_seconds(sum(r for _, r in group))
        total += now * len(group)
    return now, total


def best_at_wall(front: Sequence[Point], wall: float) -> Point | None:
    """The least sum of completion times among schedules no longer than `wall`."""
    within = [p for p in front if p[0] <= wall * (1 + 1e-9)]
    return min(within, key=lambda p: p[1]) if within else None
