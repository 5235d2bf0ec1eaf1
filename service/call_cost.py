"""What a UNet call costs by its size on this worker's device, and how to split rows into calls.

Time per row is not constant: on a GPU it falls as calls grow until the device is saturated;
on a CPU it can rise past a few rows (caches), so one 12-row call may cost more than two
6-row calls. The worker measures the curve at warm-up (`measure`), and the engine splits each
group's rows into the calls with the least estimated total time (`CallCosts.split`); the
per-call row limit (`max_batch`, lowered after an out-of-memory error) stays an upper bound.

The same estimates decide which jobs a step advances (service.call_plan.CallPlanner.select):
with time about linear in rows, running every job in every call only stretches the short
ones, so the jobs closest to their end may go first.

Calls of other latent sizes are estimated from the same curve by their *work*, rows × latent
pixels / the measured latent pixels: a UNet's cost follows the pixels it processes.
"""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.capabilities import probe_inputs
from model.compiled import default_buckets
from model.denoise import denoise_step
from model.pipeline import Pipeline
from service.settings import PinnedCallCosts

log = logging.getLogger(__name__)


EFFICIENT_WITHIN = 0.05
"""A call size counts as efficient when its time per row is within 5% of the least."""


@dataclass(frozen=True)
class CallCosts:
    """Measured seconds per UNet call at increasing work (rows at ``pixels`` latent pixels)."""

    points: tuple[tuple[float, float], ...]  # (work, seconds), work increasing
    pixels: int  # latent pixels (h × w) of the measured calls
    buckets: tuple[int, ...] | None = None  # a compiled UNet's call sizes: rows pad up to one

    def __post_init__(self) -> None:
        works = [w for w, _ in self.points]
        if not works or works != sorted(set(works)) or works[0] <= 0:
            raise ValueError(f"call costs need increasing positive work, got {works}")

    def seconds(self, rows: int, pixels: int) -> float:
        """Estimated seconds of one call of ``rows`` rows at ``pixels`` latent pixels:
        piecewise linear through the measurements, extended by the nearest segment. With
        buckets a call costs its bucket's rows (the compiled UNet pads it up to them)."""
        if self.buckets is not None:
            rows = next((b for b in self.buckets if b >= rows), rows)
        work = rows * pixels / self.pixels
        pts = self.points
        if len(pts) == 1:
            return pts[0][1] * work / pts[0][0]
        i = min(max(bisect_left([w for w, _ in pts], work), 1), len(pts) - 1)
        (w0, s0), (w1, s1) = pts[i - 1], pts[i]
        return max(s0 + (s1 - s0) * (work - w0) / (w1 - w0), 1e-9)

    def efficient_rows(self, limit: int, pixels: int, tolerance: float = EFFICIENT_WITHIN) -> int:
        """The smallest call size (1..limit rows) whose time per row is within ``tolerance``
        of the least: larger calls would save at most that much work, while every row in
        them waits for the whole call (on a CPU, whose time grows about linearly with rows,
        this is a few rows; on a GPU, where rows are nearly free until it saturates, the
        limit)."""
        per_row = [self.seconds(r, pixels) / r for r in range(1, limit + 1)]
        least = min(per_row)
        return next(r for r, c in enumerate(per_row, start=1) if c <= least * (1 + tolerance))

    def split(self, rows: Sequence[int], pixels: int, limit: int) -> list[int]:
        """Split samples of ``rows`` rows each (in order; a sample's rows share a call) into
        calls of at most ``limit`` rows with the least estimated total time; returns the
        number of samples per call. Ties go to fewer calls."""
        return self._best_split(rows, pixels, limit)[1]

    def split_seconds(self, rows: Sequence[int], pixels: int, limit: int) -> float:
        """Estimated seconds of ``split``'s calls."""
        return self._best_split(rows, pixels, limit)[0]

    def _best_split(self, rows: Sequence[int], pixels: int, limit: int) -> tuple[float, list[int]]:
        total = sum(rows)
        best: tuple[float, list[int]] | None = None
        seen: set[int] = set()
        for calls in range(1, total + 1):
            target = min(limit, -(-total // calls))  # ceil: calls of about equal size
            if target in seen:
                continue
            seen.add(target)
            counts, sizes = _fill(rows, target)
            cost = sum(self.seconds(size, pixels) for size in sizes)
            if best is None or cost < best[0] * (1 - 1e-6):
                best = (cost, counts)
        assert best is not None
        return best

    def to_dict(self) -> dict[str, object]:
        return {"pixels": self.pixels, "points": [list(p) for p in self.points],
                "buckets": None if self.buckets is None else list(self.buckets)}  # fmt: skip


def _fill(rows: Sequence[int], target: int) -> tuple[list[int], list[int]]:
    """Greedy calls of at most ``target`` rows (a sample bigger than it goes alone)."""
    counts: list[int] = []
    sizes: list[int] = []
    for r in rows:
        if counts and sizes[-1] + r <= target:
            counts[-1] += 1
            sizes[-1] += r
        else:
            counts.append(1)
            sizes.append(r)
    return counts, sizes


def measure(pipeline: Pipeline, max_rows: int, side: int | None = None,
            budget_s: float = 20.0, repeats: int = 2) -> CallCosts:  # fmt: skip
    """Time real denoising steps of 1, 2, 4, ... rows at ``side`` pixels (default: the
    model's native size); stops early once the measurements used ``budget_s`` (the larger
    sizes are then extrapolated from the last segment)."""
    probe = probe_inputs(pipeline, side or pipeline.native_size)
    emb = pipeline.encode_prompts([""])
    width, height = probe["width"], probe["height"]
    points: list[tuple[float, float]] = []
    spent = 0.0
    for rows in default_buckets(max_rows):
        job = pipeline.begin(
            emb, None, width=width, height=height, steps=2, guidance_scale=1.0,
            sampler="euler", seed=0, num_images=rows, image=probe.get("image"),
            mask=probe.get("mask"),
        )  # fmt: skip
        times = []
        for _ in range(repeats + 1):  # the first call of a new size warms it up
            start = time.perf_counter()
            denoise_step(pipeline.unet_forward, job.rows)
            if pipeline.device.type == "cuda":
                torch.cuda.synchronize(pipeline.device)
            times.append(time.perf_counter() - start)
        spent += sum(times)
        points.append((float(rows), min(times[1:])))
        if spent > budget_s:
            break
    f = pipeline.vae_scale_factor
    costs = CallCosts(tuple(points), (width // f) * (height // f), _buckets(pipeline))
    log.info("UNet call costs at %dx%d: %s; to pin them: LDMSERVE_CALL_COSTS='%s'", width,
             height, ", ".join(f"{int(w)} rows {s * 1000:.1f} ms" for w, s in points),
             json.dumps(costs.to_dict()))  # fmt: skip
    return costs


def pinned(pipeline: Pipeline, spec: PinnedCallCosts) -> CallCosts:
    """Costs an operator gave (setting ``call_costs``) instead of measuring them; a compiled
    UNet still pads calls to its buckets."""
    costs = CallCosts(tuple(spec.points), spec.pixels, _buckets(pipeline))
    log.info("UNet call costs pinned at %d latent pixels: %s", costs.pixels, list(costs.points))
    return costs


def _buckets(pipeline: Pipeline) -> tuple[int, ...] | None:
    compiled = pipeline.compiled_unet
    return None if compiled is None else compiled.buckets
