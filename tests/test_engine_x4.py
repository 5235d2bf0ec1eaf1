"""Continuous batching of the x4 upscaler: jobs of one input size share UNet calls whatever
their prompts, seeds, samplers, step counts, guidance and noise levels (the noise level is a
per-row class label, the noised low-res image per-row concat channels), and each equals its
solo `generate()`; another input size runs in its own group; a large upscale decodes in tiles
(the x4 VAE's mid-block attention makes the seams inexact: docs/ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from service.engine import Engine
from service.engine_types import GenerationRequest
from tests.reference_x4 import build_x4_reference, low_res_input, save_x4_reference
from tests.test_engine import assert_all_equal_solo, run_until_idle


@pytest.fixture(scope="module")
def x4(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    folder = tmp_path_factory.mktemp("engine-x4") / "pipeline"
    save_x4_reference(build_x4_reference("test"), Path(folder))
    return load_pipeline(str(folder), device="cpu")


def req(id: str, **fields: Any) -> GenerationRequest:
    return GenerationRequest.of(id, image=fields.pop("image", None), **fields)


def test_upscale_jobs_share_unet_calls_and_equal_solo(x4: Pipeline) -> None:
    engine = Engine(x4, max_batch=8)
    a, b = low_res_input(20, 12, seed=1), low_res_input(20, 12, seed=2)
    jobs = [
        req("x0", prompt="a fox", image=a, steps=5, sampler="ddim", seed=1, noise_level=10),
        req("x1", prompt="a whale", negative_prompt="ugly", image=b, steps=4, sampler="euler_a",
            seed=2, num_images=2, noise_level=70, guidance_scale=4.0),
        req("x2", prompt="moss", image=a, steps=3, sampler="dpmpp_2m", seed=3,
            guidance_scale=1.0),
        req("x3", prompt="a fox", image=low_res_input(16, 16, seed=3), steps=3, sampler="heun",
            seed=4, noise_level=0),
    ]  # fmt: skip
    handles = [engine.submit(j) for j in jobs]
    outputs = run_until_idle(engine)
    calls = {call for o in outputs for call in o.calls}  # (rows, jobs)
    assert (2 + 4 + 1, 3) in calls, "x0 (CFG), x1 (2 images, CFG), x2 (no CFG) share calls"
    assert max(rows for rows, _ in calls) == 7, "x3 (16x16 input) runs in its own group"
    assert_all_equal_solo(x4, handles)
    assert handles[0].images[0].shape == (48, 80, 3)  # 4x the 20x12 input
    assert handles[3].images[0].shape == (64, 64, 3)


def test_refused_at_submit(x4: Pipeline) -> None:
    image = low_res_input(20, 12)
    for fields, name in (
        ({"noise_level": 100}, "noise_level"),  # the tiny UNet embeds levels 0..99
        ({"width": 64, "height": 48}, "width"),
    ):
        with pytest.raises(GenerationError) as err:
            Engine(x4).submit(req("r", prompt="a fox", image=image, steps=2, **fields))
        assert err.value.field == name


def test_large_upscale_decodes_in_tiles(x4: Pipeline) -> None:
    """A 160x136 input (latent 160x136 > the 128 x 128 tile): the decoder only ever sees tiles
    of at most 128 latents a side, and the result stays close to the whole decode (the x4
    VAE's group norms and mid-block attention see one tile: the bound is statistical)."""
    image = low_res_input(160, 136, seed=9)
    seen: list[tuple[int, ...]] = []
    hook = x4.vae.decoder.register_forward_pre_hook(  # type: ignore[attr-defined]
        lambda _m, args: seen.append(tuple(args[0].shape))
    )
    kw: dict[str, Any] = {"image": image, "steps": 2, "sampler": "ddim", "seed": 3}
    try:
        (tiled,) = x4.generate("a fox", guidance_scale=1.0, **kw)
        tile_inputs, seen[:] = list(seen), []
        (whole,) = replace(x4, decode_tile=1024).generate("a fox", guidance_scale=1.0, **kw)
    finally:
        hook.remove()
    assert tiled.size == whole.size == (640, 544)
    assert {s[2:] for s in tile_inputs} == {(128, 128)} and len(tile_inputs) == 4
    assert [s[2:] for s in seen] == [(136, 160)]
    diff = np.abs(np.asarray(tiled, dtype=int) - np.asarray(whole, dtype=int))
    share = float((diff > 2).mean())
    assert diff.mean() < 1.5 and share < 0.1, f"mean {diff.mean():.2f}, >2: {share:.1%}"
