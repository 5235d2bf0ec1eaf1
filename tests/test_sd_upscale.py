"""Stability's x4 upscaler through generate() against diffusers' StableDiffusionUpscalePipeline
on every sampler (v-prediction), with and without CFG, at three noise levels, from non-square
inputs (one resized by the pipeline's bicubic rounding to multiples of 4), fp32 CPU, tiny
random weights in the shape of diffusers' own test for that pipeline plus an irregular shape;
loaded from the saved diffusers folders, and from an original-layout single file written from
the same weights. Max pixel difference <= 2 of 255.

diffusers draws the low-res noise with `image.shape` (batch 1), so it takes one generator per
call; the oracle runs once per image with Generator(seed + i), which is ldmserve's noise
convention (image i of seed s is image 0 of seed s + i).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image
from safetensors.torch import save_file

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from model.samplers import SAMPLER_NAMES
from model.sd_upscale import X4_FAMILY, X4_SCHEDULER_CONFIG
from model.text_ldm import open_clip_state_dict
from model.unet_convert import unet_state_dict_to_ldm
from model.vae_convert import vae_state_dict_to_ldm
from tests.reference_x4 import (
    build_x4_reference,
    low_res_input,
    save_x4_reference,
    x4_reference_images,
)
from tests.test_ldm_families import SCHEDULERS, max_diff

log = logging.getLogger(__name__)
Models = tuple[StableDiffusionUpscalePipeline, Pipeline, Path]
SEED = 17
INPUTS = {"test": (20, 12), "irregular": (22, 14)}  # irregular: resized down to 20x12
# (shape, guidance scale, noise level): CFG and not, three noise levels
CASES = [("test", 7.5, 20), ("test", 1.0, 60), ("irregular", 5.0, 300)]
PROMPT, NEGATIVE = "a red fox in snow", "blurry"


@pytest.fixture(scope="module")
def x4_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Models]:
    """Per shape, built on first use: the diffusers pipeline, ours from its folder, the folder."""
    cache: dict[str, Models] = {}

    def get(shape: str) -> Models:
        if shape not in cache:
            ref = build_x4_reference(shape)
            folder = save_x4_reference(ref, tmp_path_factory.mktemp(f"x4-{shape}") / "pipeline")
            cache[shape] = (ref, load_pipeline(str(folder), device="cpu"), folder)
        return cache[shape]

    return get


def reference(ref: Any, sampler: str, image: Image.Image, n: int, **kw: Any) -> np.ndarray:
    cls, override, steps = SCHEDULERS[sampler]
    ref.scheduler = cls.from_config({**X4_SCHEDULER_CONFIG, **override})
    return x4_reference_images(ref, image, SEED, n, num_inference_steps=steps, **kw)


def ours(pipe: Pipeline, sampler: str, image: Image.Image, n: int, **kw: Any) -> np.ndarray:
    steps = SCHEDULERS[sampler][2]
    images = pipe.generate(image=image, steps=steps, sampler=sampler, seed=SEED, num_images=n, **kw)
    return np.stack([np.asarray(im) for im in images])


@pytest.mark.parametrize("case", CASES, ids=[f"{s}-cfg{g}-noise{n}" for s, g, n in CASES])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_generate_matches_diffusers(
    x4_models: Callable[[str], Models],
    sampler: str,
    case: tuple[str, float, int],
) -> None:
    shape, guidance, level = case
    ref, pipe, _ = x4_models(shape)
    image = low_res_input(*INPUTS[shape])
    negative = NEGATIVE if guidance > 1 else ""
    kw = {"guidance_scale": guidance, "noise_level": level, "negative_prompt": negative}
    expected = reference(ref, sampler, image, 2, prompt=PROMPT, **kw)
    got = ours(pipe, sampler, image, 2, prompt=PROMPT, **kw)
    assert got.shape == expected.shape == (2, 48, 80, 3)  # 4x the (rounded) input
    assert max_diff(got[0], got[1]) > 10, "images of seeds s and s+1 must differ"
    diff = max_diff(got, expected)
    log.info(
        "x4 %s/%s/cfg %s/noise %d: max pixel difference %d", shape, sampler, guidance, level, diff
    )
    assert diff <= 2, f"{shape}/{sampler}/cfg {guidance}/noise {level}: {diff}/255"


def test_noise_level_changes_the_image(x4_models: Callable[[str], Models]) -> None:
    _, pipe, _ = x4_models("test")
    image = low_res_input(*INPUTS["test"])
    low, high = (ours(pipe, "ddim", image, 1, prompt=PROMPT, noise_level=v) for v in (0, 90))
    default = ours(pipe, "ddim", image, 1, prompt=PROMPT)
    assert max_diff(low, high) > 10
    np.testing.assert_array_equal(
        default, ours(pipe, "ddim", image, 1, prompt=PROMPT, noise_level=20)
    )


def _single_file(pipe: Pipeline, path: Path) -> Path:
    """Our weights under the original x4 file's names: UNet, VAE, OpenCLIP text tower with the
    one block beyond the penultimate that SD 2.x files hold (unused; random values here)."""
    text = pipe.text.model  # type: ignore[union-attr]
    prefix = "cond_stage_model.model."
    tower = open_clip_state_dict(text, prefix)
    blocks = text.config.num_hidden_layers
    last = f"{prefix}transformer.resblocks.{blocks - 1}."
    extra = {
        k.replace(last, f"{prefix}transformer.resblocks.{blocks}."): v + 0.5
        for k, v in tower.items()
        if k.startswith(last)
    }
    state = {
        **unet_state_dict_to_ldm(pipe.unet),  # type: ignore[arg-type]
        **vae_state_dict_to_ldm(pipe.vae),  # type: ignore[arg-type]
        **tower,
        **extra,
    }
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_single_file_gives_the_folder_images(
    x4_models: Callable[[str], Models], tmp_path: Path
) -> None:
    """Detected by the UNet's 7 channels; heads, VAE scaling, schedules and max noise level
    from the x4's conventions (model/sd_upscale.py), which the test folder shares."""
    ref, folder, _ = x4_models("test")
    single = load_pipeline(str(_single_file(folder, tmp_path / "x4.safetensors")), device="cpu")
    assert single.family == X4_FAMILY and single.vae.scaling_factor == 0.08333
    # SD 2.x's float32 attention rule applies to single files; in float32 it changes nothing
    assert replace(single.unet.config, upcast_attention=False) == folder.unet.config
    assert single.schedule == folder.schedule and single.low_res_noise == folder.low_res_noise
    a, b = (single.capabilities.to_dict(), folder.capabilities.to_dict())
    assert {**a, "native_size": 0} == {**b, "native_size": 0}
    image = low_res_input(*INPUTS["test"])
    kw = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": 6.0, "noise_level": 40}
    got = ours(single, "euler_a", image, 2, **kw)
    np.testing.assert_array_equal(got, ours(folder, "euler_a", image, 2, **kw))
    assert max_diff(got, reference(ref, "euler_a", image, 2, **kw)) <= 2


def test_capabilities(x4_models: Callable[[str], Models]) -> None:
    for shape, most in (("test", 99), ("irregular", 350)):  # test: a 100-row class table
        caps = x4_models(shape)[1].capabilities
        assert caps.family == X4_FAMILY and caps.modes == ("upscale",) and caps.takes_prompt
        assert caps.upscale_factor == 4 and caps.upscale_input_multiple == 4
        assert caps.max_output_pixels == 2048 * 2048 and caps.prediction_type == "v_prediction"
        assert caps.fields == ("noise_level",) and caps.max_noise_level == most


def test_refusals(x4_models: Callable[[str], Models]) -> None:
    _, pipe, _ = x4_models("test")
    image = low_res_input(*INPUTS["test"])
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({}, "image", "cannot run txt2img"),
        ({"image": image, "noise_level": 100}, "noise_level", r"noise_level must be in 0\.\.99"),
        ({"image": image, "noise_level": -1}, "noise_level", r"in 0\.\.99, got -1"),
        ({"image": image, "width": 64, "height": 48}, "width", "80x48 here"),
        ({"image": low_res_input(600, 520)}, "image", "exceeds 4194304 pixels"),
        ({"image": image, "mask": Image.new("L", image.size)}, "mask", "cannot run inpaint"),
        ({"image": image, "strength": 0.5}, "strength", "strength needs"),
    ]
    for kw, field, message in cases:
        with pytest.raises(GenerationError, match=message) as err:
            pipe.generate(PROMPT, steps=1, **kw)
        assert err.value.field == field, kw
