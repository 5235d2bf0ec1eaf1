"""Getting a loaded model ready to serve, before the worker claims its first job: one tiny
generation (so first requests don't pay for lazy initialisation), the compiled UNet where the
settings ask for it (`compile_unet`), warmed at the sizes it will serve, and the UNet's call
costs on this device (service.call_cost) for the engine's call sizing.
"""

from __future__ import annotations

import logging
import time

from model.capabilities import probe_inputs
from model.compiled import default_buckets
from model.pipeline import Pipeline
from service import call_cost
from service.call_cost import CallCosts
from service.settings import Settings

log = logging.getLogger(__name__)


def warm_up(pipeline: Pipeline, settings: Settings | None = None) -> CallCosts | None:
    """One tiny generation so first requests don't pay for lazy initialisation; then, with
    ``call_sizing`` on, the UNet's call costs on this device (service.call_cost), or the
    ones the ``call_costs`` setting pins."""
    start = time.perf_counter()
    pipeline.generate(**probe_inputs(pipeline, 8 * pipeline.vae_scale_factor), steps=1,
                      sampler="euler")  # fmt: skip
    log.info("warm-up took %.2fs", time.perf_counter() - start)
    if settings is not None and settings.compile_unet:
        mode = settings.compile_mode
        if mode is None and pipeline.device.type == "cuda":
            mode = "reduce-overhead"  # CUDA graphs per bucket
        pipeline.compile_unet(default_buckets(settings.max_batch), mode)
        for side in settings.compile_sides or [pipeline.native_size]:
            pipeline.warm_compiled(side, side)
    if settings is None or not settings.call_sizing:
        return None
    if settings.call_costs is not None:
        return call_cost.pinned(pipeline, settings.call_costs)
    return call_cost.measure(
        pipeline, settings.max_batch, settings.call_sizing_side, settings.call_sizing_budget_s
    )
