"""The engine's host-side element-wise work (UNet input scaling, CFG combine, sampler updates)
runs on one CPU thread.

A step makes tens of element-wise passes over a few MB of latents. Split across OpenMP
threads, each pass pays a thread wake-up: on the 2-core CI machine with
OMP_WAIT_POLICY=PASSIVE (what the tests and benchmarks set) a 4-row pass at SD 1.5's 512²
latent took ~80 µs on two threads and ~5–10 µs on one, and 32 mixed-sampler rows spent
6.8 ms per step outside the UNet on two threads against 2.3 ms on one
(`bench/engine_overhead.py`). Element-wise results do not depend on the thread count, so
this changes time only; the UNet itself keeps every thread.

Noise is the exception: a CPU generator draws serially (one Mersenne Twister stream, 60–80 µs
per SD 1.5 512² row here), and each drawing row has its own generator, so a step's rows are
drawn on up to as many Python threads as torch had outside the block (`fill_normal`; torch
releases the GIL while it draws), when each thread gets enough to draw: 8 such rows took
0.66 ms on one thread and 0.36 ms on two. Each row's values are still exactly its
generator's. Running the sampler updates of different rule groups side by side the same way
measured slower (thread hand-offs, one memory bus), so they stay on one thread.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

PARALLEL_DRAW = 32768
"""Values each thread should draw at least (~0.1 ms here): below, handing work to a thread
costs more than it saves."""

_outer_threads = 1  # torch's thread count outside the innermost one_cpu_thread block
_pool: ThreadPoolExecutor | None = None  # helper threads, made on first use
_pool_size = 0


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Within the block, torch's intra-op pool is one thread when `device` is the CPU."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield
        return
    global _outer_threads
    outer, _outer_threads = _outer_threads, before
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _outer_threads = outer


def run_parallel(tasks: Sequence[Callable[[], T]], device: torch.device) -> list[T]:
    """The tasks' results, in order. On the CPU inside `one_cpu_thread` they run on up to the
    outer thread count of Python threads (the caller among them, each taking the next task
    when done: tasks of unequal size balance); torch releases the GIL in its kernels, so
    independent element-wise passes overlap. Elsewhere, or for one task, in order here."""
    threads = min(len(tasks), _outer_threads if device.type == "cpu" else 1)
    if threads < 2:
        return [task() for task in tasks]
    global _pool, _pool_size
    if _pool is None or _pool_size < threads - 1:  # grows with the largest need seen
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="host")
        _pool_size = threads - 1
    results: list[T | None] = [None] * len(tasks)
    order = iter(range(len(tasks)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            results[i] = tasks[i]()

    helpers = [_pool.submit(work) for _ in range(threads - 1)]
    work()
    for helper in helpers:
        helper.result()
    return results  # type: ignore[return-value]


def fill_normal(rows: Tensor, generators: Sequence[torch.Generator]) -> None:
    """rows[i] ~ N(0, 1) from generators[i], exactly as torch.randn(..., generator=...) draws
    it; on the CPU the rows are split over threads (`run_parallel`; see the module docstring)."""
    if rows.shape[0] != len(generators):
        raise ValueError(f"{rows.shape[0]} rows, {len(generators)} generators")
    per_row = rows[0].numel() if len(rows) else 0
    parts = max(1, min(len(generators), _outer_threads, len(rows) * per_row // PARALLEL_DRAW))
    bounds = [len(generators) * k // parts for k in range(parts + 1)]
    run_parallel(
        [partial(_fill, rows[a:b], generators[a:b]) for a, b in itertools.pairwise(bounds)],
        rows.device,
    )


def _fill(rows: Tensor, generators: Sequence[torch.Generator]) -> None:
    for row, gen in zip(rows.split(1), generators, strict=True):
        row.normal_(generator=gen)
