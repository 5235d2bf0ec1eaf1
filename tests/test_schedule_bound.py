"""bench/schedule_bound.py: the exhaustive schedule search the engine benchmark quotes."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from schedule_bound import best_at_wall, groups_in_turn, pareto


def brute_force(jobs: list[tuple[int, int]], cost) -> set[tuple[float, float]]:
    """Every schedule of distinct jobs (no symmetry), as (wall, sum of completion times)."""
    out: set[tuple[float, float]] = set()

    def walk(left: tuple[int, ...], wall: float, total: float) -> None:
        live = [i for i, n in enumerate(left) if n]
        if not live:
            out.add((round(wall, 9), round(total, 9)))
            return
        for k in range(1, len(live) + 1):
            for chosen in itertools.combinations(live, k):
                step = cost(sum(jobs[i][1] for i in chosen))
                nxt = tuple(n - (i in chosen) for i, n in enumerate(left))
                walk(nxt, wall + step, total + step * len(live))

    walk(tuple(n for n, _ in jobs), 0.0, 0.0)
    return out


def dominated_front(points: set[tuple[float, float]]) -> list[tuple[float, float]]:
    front: list[tuple[float, float]] = []
    for wall, total in sorted(points):
        if not front or total < front[-1][1] - 1e-9:
            front.append((wall, total))
    return front


@pytest.mark.parametrize("overhead", [0.0, 0.5, 3.0])
def test_matches_brute_force(overhead: float) -> None:
    jobs = [(1, 2), (2, 2), (2, 2), (3, 2)]
    cost = lambda rows: overhead + 0.8 * rows  # noqa: E731
    got = [(round(w, 9), round(t, 9)) for w, t in pareto(jobs, cost)]
    want = dominated_front(brute_force(jobs, cost))
    assert len(want) > (1 if overhead else 0)
    assert got == want


def test_linear_costs_shortest_first_and_flat_costs_all_together() -> None:
    jobs = [(2, 2), (4, 2)]
    # Time linear in rows: every schedule takes the same wall; shortest job first is best.
    assert pareto(jobs, lambda rows: float(rows)) == [(12.0, 4.0 + 12.0)]
    # Rows free (a GPU far from saturation): one call per step for both.
    assert pareto(jobs, lambda rows: 1.0) == [(4.0, 2.0 + 4.0)]


def test_static_schedule_is_never_better_than_the_front() -> None:
    cost = lambda rows: 1.0 + 0.7 * rows  # noqa: E731
    groups = [[(2, 2)] * 3, [(4, 2)] * 3]
    static = groups_in_turn(groups, cost)
    assert static == pytest.approx((6 * cost(6), 3 * 2 * cost(6) + 3 * 6 * cost(6)))
    best = best_at_wall(pareto([w for g in groups for w in g], cost), static[0])
    assert best is not None and best[1] <= static[1] + 1e-9
    assert best_at_wall([(5.0, 1.0)], 4.0) is None
