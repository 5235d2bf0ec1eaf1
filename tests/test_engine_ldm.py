"""Continuous batching of the text-free LDM families: unconditional and upscale jobs of one
model share UNet calls whatever their seeds, samplers and step counts, and each equals its
solo `generate()`; upscale jobs of different input sizes run in separate shape groups; a
large upscale decodes in tiles."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from model.pipeline import Pipeline
from service.engine import Engine
from service.engine_types import GenerationRequest, JobState
from tests.test_engine import assert_all_equal_solo, run_until_idle
from tests.tiny import ldm_pipeline


@pytest.fixture(scope="module")
def uncond() -> Pipeline:
    return ldm_pipeline("uncond")


@pytest.fixture(scope="module")
def upscaler() -> Pipeline:
    return ldm_pipeline("sr")


def low_res(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def req(id: str, **fields: Any) -> GenerationRequest:
    return GenerationRequest.of(id, image=fields.pop("image", None), **fields)


def test_unconditional_jobs_batch_and_equal_solo(uncond: Pipeline) -> None:
    engine = Engine(uncond, max_batch=8)
    jobs = [
        req("u0", steps=6, sampler="ddim", seed=1, num_images=2),
        req("u1", steps=4, sampler="pndm", seed=2),
        req("u2", steps=5, sampler="dpmpp_2m", seed=3),
    ]
    handles = [engine.submit(j) for j in jobs]
    outputs = run_until_idle(engine)
    assert max(rows for o in outputs for rows, _ in o.calls) == 4, "one row per image, no CFG"
    assert sum(len(o.calls) for o in outputs) < sum(j.params.steps for j in jobs)
    assert_all_equal_solo(uncond, handles)
    assert handles[0].images[0].shape == (64, 64, 3)


def test_upscale_jobs_batch_by_input_size_and_equal_solo(upscaler: Pipeline) -> None:
    engine = Engine(upscaler, max_batch=8)
    jobs = [
        req("s0", image=low_res(64, 32, 1), steps=5, sampler="ddim", seed=1),
        req("s1", image=low_res(64, 32, 2), steps=4, sampler="euler", seed=2, num_images=2),
        req("s2", image=low_res(32, 32, 3), steps=3, sampler="dpmpp_2m", seed=3),
    ]
    handles = [engine.submit(j) for j in jobs]
    outputs = run_until_idle(engine)
    calls = {call for o in outputs for call in o.calls}  # (rows, jobs)
    assert (3, 2) in calls and (1, 1) in calls, "s0 + s1 share calls; s2 (32x32) runs apart"
    assert max(rows for rows, _ in calls) == 3
    assert_all_equal_solo(upscaler, handles)
    assert handles[0].images[0].shape == (64, 128, 3)  # 2x the 64x32 input
    assert handles[2].images[0].shape == (64, 64, 3)


def test_refused_at_submit(upscaler: Pipeline, uncond: Pipeline) -> None:
    from model.pipeline import GenerationError

    with pytest.raises(GenerationError) as err:
        Engine(uncond).submit(req("p", prompt="a face", steps=2))
    assert err.value.field == "prompt"
    with pytest.raises(GenerationError) as err:
        Engine(upscaler).submit(req("w", image=low_res(64, 32, 1), width=64, height=64, steps=2))
    assert err.value.field == "width"
    handle = Engine(upscaler).submit(req("ok", image=low_res(64, 32, 1), steps=2))
    assert handle.state is JobState.PENDING


def test_large_upscale_decodes_in_tiles(upscaler: Pipeline) -> None:
    """A 160x136 input (latent 160x128 > the 128 x 128 tile): the decoder only ever sees
    tiles of at most 128 latents a side, the output has the full size, and it stays close to
    the whole-latent decode (figures: docs/ARCHITECTURE.md, "Tiled decoding")."""
    image = low_res(160, 136, 9)  # rounded down to 160x128
    seen: list[tuple[int, ...]] = []
    hook = upscaler.vae.decoder.register_forward_pre_hook(  # type: ignore[attr-defined]
        lambda _m, args: seen.append(tuple(args[0].shape))
    )
    try:
        (tiled,) = upscaler.generate(image=image, steps=2, sampler="ddim", seed=3)
        tile_inputs, seen[:] = list(seen), []
        whole_pipe = replace(upscaler, decode_tile=1024)
        (whole,) = whole_pipe.generate(image=image, steps=2, sampler="ddim", seed=3)
    finally:
        hook.remove()
    assert tiled.size == whole.size == (320, 256)
    assert tile_inputs == [(1, 3, 128, 128), (1, 3, 128, 128)]  # two tiles across, 96 apart
    assert seen == [(1, 3, 128, 160)]
    diff = np.abs(np.asarray(tiled, dtype=int) - np.asarray(whole, dtype=int))
    assert diff.mean() < 40, f"tiled vs whole: mean {diff.mean():.1f}, max {diff.max()}"
