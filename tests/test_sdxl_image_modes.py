"""SDXL img2img, the refiner and inpainting against diffusers' StableDiffusionXLImg2ImgPipeline
and StableDiffusionXLInpaintPipeline (tiny random weights, fp32 CPU, max difference 2/255)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from model.samplers import SD15_SCHEDULER_CONFIG
from tests.reference_sdxl import (
    SDXL_KW,
    build_sdxl_reference,
    build_sdxl_refiner,
    sdxl_reference_images,
)
from tests.test_pipeline_image_modes import hard_mask, source_image
from tests.test_pipeline_samplers import REFERENCE, max_diff, write_scheduler_config

SAMPLERS = tuple(REFERENCE)  # every sampler
Pair = tuple[Any, Pipeline]


def _saved(pipe: Any, folder: Path) -> Pipeline:
    pipe.save_pretrained(folder, safe_serialization=True)
    write_scheduler_config(folder, SD15_SCHEDULER_CONFIG)
    return load_pipeline(str(folder), device="cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    ref = build_sdxl_reference()
    return ref, _saved(ref, tmp_path_factory.mktemp("sdxl") / "base")


@pytest.fixture(scope="module")
def refiner(base: Pair, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    ref = build_sdxl_refiner(base[0])
    return ref, _saved(ref, tmp_path_factory.mktemp("sdxl") / "refiner")


def _compare(ref: Any, ours: Pipeline, sampler: str, **kw: Any) -> int:
    cls, override, steps, guidance = REFERENCE[sampler]
    ref.scheduler = cls.from_config({**SD15_SCHEDULER_CONFIG, **override})
    kw = {**SDXL_KW, "steps": steps, "guidance_scale": guidance, **kw}
    expected = sdxl_reference_images(ref, **dict(kw))
    got = np.stack([np.asarray(im) for im in ours.generate(sampler=sampler, **kw)])
    assert got.shape == expected.shape
    return max_diff(got, expected)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_base_img2img_matches_diffusers(base: Pair, sampler: str) -> None:
    ref, ours = base
    img2img = StableDiffusionXLImg2ImgPipeline(
        **ref.components, force_zeros_for_empty_prompt=True, add_watermarker=False
    )
    img2img.set_progress_bar_config(disable=True)
    diff = _compare(img2img, ours, sampler, image=source_image(), strength=0.6)
    assert diff <= 2, f"SDXL img2img {sampler}: max pixel difference {diff}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_refiner_matches_diffusers(refiner: Pair, sampler: str) -> None:
    ref, ours = refiner
    diff = _compare(ref, ours, sampler, image=source_image(), strength=0.5)
    assert diff <= 2, f"SDXL refiner {sampler}: max pixel difference {diff}"


def test_refiner_aesthetic_scores_and_empty_negative_match_diffusers(refiner: Pair) -> None:
    ref, ours = refiner
    kw = {"image": source_image(), "strength": 0.7, "num_images": 1, "negative_prompt": ""}
    scores = {"aesthetic_score": 8.0, "negative_aesthetic_score": 1.0}
    assert _compare(ref, ours, "euler", **kw, **scores) <= 2
    default = _compare(ref, ours, "euler", **kw)  # the defaults 6.0 / 2.5
    assert default <= 2


def test_refiner_describes_itself(refiner: Pair) -> None:
    _, ours = refiner
    caps = ours.capabilities
    assert caps.family == "sdxl-refiner" and caps.modes == ("img2img", "inpaint")
    assert caps.fields == ("aesthetic_score", "negative_aesthetic_score")
    assert not ours.zero_empty_negative and ours.time_id_count == 5
    with pytest.raises(GenerationError, match="cannot run txt2img"):
        ours.generate("x", width=64, height=64, steps=2)
    with pytest.raises(GenerationError, match="does not take prompt_2") as info:
        ours.generate("x", image=source_image(), prompt_2="y", steps=2)
    assert info.value.field == "prompt_2"


@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_base_inpainting_matches_diffusers(base: Pair, sampler: str, strength: float) -> None:
    """4-channel SDXL: diffusers' blend path; one image per call (see the noise convention)."""
    ref, ours = base
    inpaint = StableDiffusionXLInpaintPipeline(
        **ref.components, force_zeros_for_empty_prompt=True, add_watermarker=False
    )
    inpaint.set_progress_bar_config(disable=True)
    kw = {"image": source_image(), "mask": hard_mask(), "strength": strength, "num_images": 1}
    diff = _compare(inpaint, ours, sampler, **kw)
    assert diff <= 2, f"SDXL inpainting {sampler} strength {strength}: max pixel difference {diff}"


def test_engine_batches_refiner_jobs_with_their_own_aesthetic_scores(refiner: Pair) -> None:
    from service.engine import Engine
    from tests.test_engine import assert_all_equal_solo, req, run_until_idle

    _, ours = refiner
    image = source_image()
    jobs = [
        req("r0", "a red fox", image=image, strength=0.5, steps=6, seed=1, sampler="euler"),
        req("r1", "a red fox", image=image, strength=0.5, steps=6, seed=2, sampler="euler",
            aesthetic_score=9.0, negative_aesthetic_score=0.5),
    ]  # fmt: skip
    engine = Engine(ours, max_batch=8)
    handles = [engine.submit(j) for j in jobs]
    calls = [c for out in run_until_idle(engine) for c in out.calls]
    assert max(n for _, n in calls) == 2, "the two refiner jobs must share UNet calls"
    assert_all_equal_solo(ours, handles)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_nine_channel_inpainting_unet_matches_diffusers(
    base: Pair, strength: float, tmp_path: Path
) -> None:
    """An SDXL inpainting UNet (latents + mask + masked-image latents in)."""
    from diffusers import UNet2DConditionModel

    from tests.tiny import UNET_SDXL, randomize_

    ref, _ = base
    unet = randomize_(UNet2DConditionModel(**{**UNET_SDXL, "in_channels": 9}), seed=36, scale=0.05)
    inpaint = StableDiffusionXLInpaintPipeline(
        **{**ref.components, "unet": unet.eval()}, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )  # fmt: skip
    inpaint.set_progress_bar_config(disable=True)
    ours = _saved(inpaint, tmp_path / "inpaint")
    assert ours.capabilities.modes == ("inpaint",)
    kw = {"image": source_image(), "mask": hard_mask(), "strength": strength, "num_images": 1}
    diff = _compare(inpaint, ours, "euler", **kw)
    assert diff <= 2, f"SDXL 9-channel inpainting strength {strength}: max pixel difference {diff}"
