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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import Tensor

PARALLEL_DRAW = 32768
"""Values each thread should draw at least (~0.1 ms here): below, handing work to a thread
costs more than it saves."""

_outer_threads = 1  # torch's thread count outside the innermost one_cpu_thread block
_pool: ThreadPoolExecutor | None = None  # noise-drawing threads, made on first use
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


def fill_normal(rows: Tensor, generators: Sequence[torch.Generator]) -> None:
    """rows[i] ~ N(0, 1) from generators[i], exactly as torch.randn(..., generator=...) draws
    it; on the CPU inside `one_cpu_thread`, large draws are split over up to the outer thread
    count of Python threads, the caller drawing the first part (see the module docstring)."""
    if rows.shape[0] != len(generators):
        raise ValueError(f"{rows.shape[0]} rows, {len(generators)} generators")
    threads = _outer_threads if rows.device.type == "cpu" else 1
    per_row = rows[0].numel() if len(rows) else 0
    parts = max(1, min(len(generators), threads, len(rows) * per_row // PARALLEL_DRAW))
    if parts == 1:
        _fill(rows, generators)
        return
    global _pool, _pool_size
    if _pool is None or _pool_size < parts - 1:  # grows with the largest need seen
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="noise")
        _pool_size = parts - 1
    bounds = [len(generators) * k // parts for k in range(parts + 1)]
    spans = list(itertools.pairwise(bounds))
    helpers = [_pool.submit(_fill, rows[a:b], generators[a:b]) for a, b in spans[1:]]
    _fill(rows[: spans[0][1]], generators[: spans[0][1]])
    for helper in helpers:
        helper.result()


def _fill(rows: Tensor, generators: Sequence[torch.Generator]) -> None:
    for row, gen in zip(rows.split(1), generators, strict=True):
        row.normal_(generator=gen)
