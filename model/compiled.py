"""The UNet through `torch.compile`, called only at a few batch sizes ("buckets").

A compiled graph is specialised to its input shapes: with continuous batching the number of
rows changes at nearly every step, and each new count would compile again (seconds to
minutes). Calls are therefore padded up to the next bucket (copies of the last row, dropped
from the output: rows of a UNet call never mix, so real rows get what they would get alone)
and every bucket is compiled at worker warm-up (`warm`), not on a user's first request. On
CUDA the "reduce-overhead" mode also captures CUDA graphs per bucket. Other latent sizes
compile on first use (each size once per bucket).

Off by default everywhere (setting `compile_unet`): at SD 1.5's shape on the 2-core CPU
(quiet, 2 Dec 2026) a compiled call took 0.97-1.00 of eager's (batch 2 and 4, latent 32),
for ~100 s of compiling per bucket; an earlier 0.65 was measured under load and did not
repeat. CUDA is unmeasured (bench/gpu.py has not run on a card).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from model.conditioning import Conditioning, pad_rows

log = logging.getLogger(__name__)


def default_buckets(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... and ``max_rows``: at most twice the rows of any call are computed."""
    sizes, r = [], 1
    while r < max_rows:
        sizes.append(r)
        r *= 2
    return (*sizes, max_rows)


class BucketedUNet:
    """Calls a compiled copy of ``unet`` at bucket sizes only (see the module docstring)."""

    def __init__(
        self,
        unet: nn.Module,
        buckets: Sequence[int],
        mode: str | None = None,
        backend: str = "inductor",
    ) -> None:
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive row counts, got {list(buckets)}")
        self.unet = unet
        self.buckets = tuple(sorted(set(buckets)))
        self.mode = mode
        cpu = next(unet.parameters()).device.type == "cpu"
        options = {"freezing": True} if cpu and backend == "inductor" and mode is None else None
        self.compiled: Any = torch.compile(
            unet, dynamic=False, mode=mode, backend=backend, options=options
        )
        self._warm: set[tuple[Any, ...]] = set()  # call signatures compiled at warm-up

    def bucket(self, rows: int) -> int:
        return next((b for b in self.buckets if b >= rows), self.buckets[-1])

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        n, top = x.shape[0], self.buckets[-1]
        if n > top:  # larger than every bucket: several calls of the largest
            parts = [
                self(x[i : i + top], t[i : i + top], cond.rows_slice(i, i + top))
                for i in range(0, n, top)
            ]
            return torch.cat(parts)
        size = self.bucket(n)
        with torch.inference_mode():
            args = (_fit(x, size), _fit(t, size), cond.map_rows(lambda v: _fit(v, size)))
            key = _signature(*args)
            if self._warming:
                self._warm.add(key)
            elif key not in self._warm:  # not compiled at warm-up: eager, never a stall
                return self.unet(x, t, cond)
            out = self.compiled(*args)[:n]
            # CUDA graphs write every replay's output into the same memory; callers keep rows
            # (multistep history), so they get their own copy
            return out.clone() if self.mode == "reduce-overhead" else out

    _warming = False

    def warm(self, latent_shape: tuple[int, int, int], cond: Conditioning) -> float:
        """Compile (and run once) every bucket at ``latent_shape`` (C, h, w) with the one-row
        ``cond``; returns the seconds it took. Only warmed shapes run compiled."""
        start = time.perf_counter()
        p = next(self.unet.parameters())
        self._warming = True
        try:
            for size in self.buckets:
                x = torch.zeros(size, *latent_shape, device=p.device, dtype=p.dtype)
                t = torch.full((size,), 500.0, device=p.device)
                self(x, t, cond)
        finally:
            self._warming = False
        took = time.perf_counter() - start
        log.info("compiled the UNet for %s rows at %s in %.1fs", self.buckets, latent_shape, took)
        return took


def _signature(x: Tensor, t: Tensor, cond: Conditioning) -> tuple[Any, ...]:
    """What a compiled graph is specialised to: every input's shape and dtype."""
    values = [x, t, *(getattr(cond, f.name) for f in fields(cond))]
    return tuple((tuple(v.shape), v.dtype) if isinstance(v, Tensor) else v for v in values)


def _fit(t: Tensor, n: int) -> Tensor:
    """A fresh ``n``-row copy (padded with the last row), made in inference mode: every call
    then passes tensors of one kind, as the compiled graphs' guards expect."""
    return pad_rows(t, n) if t.shape[0] < n else t.clone()
