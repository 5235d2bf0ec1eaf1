"""Worker faults with real processes: SIGKILL mid-denoise, a slow worker, SIGTERM hand-back,
a poison job. One stack for the module: redis-server (AOF, appendfsync always), `ldmserve
api`, three workers started through tests/fault_worker.py (a plain worker unless a job's
prompt asks for a fault), with fast heartbeats (0.5 s, TTL 3 s, reclaim after 2 s) and a
1 s drain timeout. Three workers, so that while a killed or crashed one is replaced (its
successor takes tens of seconds to load on a busy 2-core machine) two are live. The
scenarios live in tests/fault_scenarios.py (bench/faults.py runs them many times and prints
the figures).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fault_scenarios as fs
from tests.processes import Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ENV = {"LDMSERVE_DRAIN_TIMEOUT_S": "1", "FAULT_SLOW_STEP_S": "0.3"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("faults-workers")
    s = Stack(root, workers=3, env=ENV)
    with s:
        yield s


def test_slow_worker_keeps_its_job(stack: Stack) -> None:
    """Steps of 0.3 s make a 20-step job last far longer than reclaim_after_s (2 s); the
    other worker is live and idle all along, yet the job finishes on attempt 1 where it
    started: only a missing heartbeat lets a job be taken over."""
    fs.slow_worker(stack, seed=1).assert_nothing_lost()


def test_sigterm_hands_back_a_job_that_outlasts_the_drain(stack: Stack) -> None:
    """Drain timeout 1 s < the job: the worker exits 0 and hands the job back (queued, the
    run not counted), the other worker runs it: running → queued → running → succeeded,
    attempt 1, images equal to the library's."""
    fs.drain_hand_back(stack, seed=2).assert_nothing_lost()


def test_sigkill_mid_denoise_loses_nothing(stack: Stack) -> None:
    """Three rounds (seeded): submit 6 jobs, SIGKILL the worker holding most of them at a
    random moment mid-denoise, start a new worker. Every job succeeds exactly once (one
    `succeeded` status message, one stored result, the jobs_succeeded counter), reclaimed
    jobs show attempt 2 and a second `running`, and every PNG equals the library's."""
    fs.worker_kill(stack, seed=3, rounds=3, per_round=6).assert_nothing_lost()


def test_poison_job_fails_after_max_attempts(stack: Stack) -> None:
    """A prompt that kills every worker receiving it: the job fails after max_attempts (3)
    with error code max_attempts and a message naming the count; the 4 jobs submitted
    around it succeed. Crashed workers are restarted by a bounded supervisor loop."""
    fs.poison_job(stack, seed=4, others=4).assert_nothing_lost()
