"""The engine's host-side element-wise work (UNet input scaling, CFG combine, sampler updates)
runs on one CPU thread.

A step makes tens of element-wise passes over a few MB of latents. Split across OpenMP
threads, each pass pays a thread wake-up: on the 2-core CI machine with
OMP_WAIT_POLICY=PASSIVE (what the tests and benchmarks set) a 4-row pass at SD 1.5's 512²
latent took ~80 µs on two threads and ~5–10 µs on one, and 32 mixed-sampler rows spent
6.8 ms per step outside the UNet on two threads against 2.3 ms on one
(`bench/engine_overhead.py`). Element-wise results do not depend on the thread count, so
this changes time only; the UNet itself keeps every thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Within the block, torch's intra-op pool is one thread when `device` is the CPU."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
