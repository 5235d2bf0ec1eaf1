"""SDXL base through generate(): a diffusers SDXL folder loads and gives diffusers'
StableDiffusionXLPipeline's images (tiny random weights, fp32 CPU, max difference 2/255)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from model.samplers import SAMPLER_NAMES, SD15_SCHEDULER_CONFIG
from tests.reference_sdxl import SDXL_KW, build_sdxl_reference, sdxl_reference_images
from tests.test_pipeline_samplers import REFERENCE, max_diff, write_scheduler_config
from tests.tiny import UNET_SDXL_DEEP


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Pipeline, Path]:
    ref = build_sdxl_reference()
    folder = tmp_path_factory.mktemp("sdxl") / "pipeline"
    ref.save_pretrained(folder, safe_serialization=True)
    write_scheduler_config(folder, SD15_SCHEDULER_CONFIG)  # each sampler's own spacing
    return ref, load_pipeline(str(folder), device="cpu"), folder


def _ours(pipe: Pipeline, **kw: Any) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe.generate(**kw)])


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_txt2img_matches_diffusers(sdxl: tuple[Any, Pipeline, Path], sampler: str) -> None:
    ref, ours, _ = sdxl
    cls, override, steps, guidance = REFERENCE[sampler]
    ref.scheduler = cls.from_config({**SD15_SCHEDULER_CONFIG, **override})
    kw = {**SDXL_KW, "steps": steps, "guidance_scale": guidance}
    expected = sdxl_reference_images(ref, **kw)
    got = _ours(ours, sampler=sampler, **kw)
    assert got.shape == expected.shape == (2, 72, 64, 3)
    diff = max_diff(got, expected)
    assert diff <= 2, f"{sampler}: max pixel difference {diff} > 2/255"
    assert max_diff(got[0], got[1]) > 10, "images of seeds s and s+1 must differ"


@pytest.mark.parametrize(
    "prompts",
    [
        {"negative_prompt": ""},  # force_zeros_for_empty_prompt: zeros, not the encoded ""
        {"prompt_2": "a blue car", "negative_prompt_2": "grainy"},
        {"prompt_2": "a blue car", "negative_prompt": ""},
    ],
)
def test_second_prompts_and_empty_negative_match_diffusers(
    sdxl: tuple[Any, Pipeline, Path], prompts: dict[str, str]
) -> None:
    ref, ours, _ = sdxl
    ref.scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    kw = {**SDXL_KW, "num_images": 1, **prompts}
    expected = sdxl_reference_images(ref, **kw)
    assert max_diff(_ours(ours, sampler="euler", **kw), expected) <= 2


def test_loaded_sdxl_folder_describes_itself(sdxl: tuple[Any, Pipeline, Path]) -> None:
    _, ours, _ = sdxl
    caps = ours.capabilities
    assert caps.family == "sdxl" and caps.fields == ("prompt_2", "negative_prompt_2")
    assert caps.native_size == 256  # the tiny UNet's sample_size 32 x f=8 (SDXL: 128 x 8)
    assert ours.vae.scaling_factor == pytest.approx(0.13025)
    assert ours.zero_empty_negative and ours.time_id_count == 6


def test_second_prompt_on_a_one_encoder_model_is_refused() -> None:
    from model.demo import build_demo

    with pytest.raises(GenerationError, match="does not take prompt_2") as info:
        build_demo().generate("x", prompt_2="y", width=64, height=64, steps=1)
    assert info.value.field == "prompt_2"


def test_engine_batches_sdxl_jobs_with_their_own_pooled_vectors_and_time_ids(
    sdxl: tuple[Any, Pipeline, Path],
) -> None:
    from service.engine import Engine
    from tests.test_engine import assert_all_equal_solo, req, run_until_idle

    _, ours, _ = sdxl
    jobs = [
        req("a", "a red fox", prompt_2="oil painting", steps=4, sampler="euler", width=64,
            height=64, seed=1, negative_prompt="blurry"),
        req("b", "a blue whale", steps=6, sampler="dpmpp_2m", width=64, height=64, seed=2),
        req("c", "a castle", steps=5, sampler="euler_a", width=64, height=64, seed=3,
            guidance_scale=1.0, num_images=2),
        req("d", "a red fox", steps=4, sampler="ddim", width=64, height=72, seed=4,
            negative_prompt_2="grainy", negative_prompt="dark"),
    ]  # fmt: skip
    engine = Engine(ours, max_batch=16)
    handles = [engine.submit(j) for j in jobs]
    calls = [c for out in run_until_idle(engine) for c in out.calls]
    assert max(n for _, n in calls) >= 3, "SDXL jobs of one size must share UNet calls"
    assert_all_equal_solo(ours, handles)


def test_fp16_load_keeps_the_force_upcast_vae_in_float32(sdxl: tuple[Any, Pipeline, Path]) -> None:
    _, _, folder = sdxl
    half = load_pipeline(str(folder), device="cpu", dtype=torch.float16)
    assert half.dtype == torch.float16 and half.vae_dtype == torch.float32


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_per_level_depths_and_irregular_heads_match_diffusers(sampler: str, tmp_path: Path) -> None:
    ref = build_sdxl_reference(unet=UNET_SDXL_DEEP)
    ref.save_pretrained(tmp_path / "deep", safe_serialization=True)
    write_scheduler_config(tmp_path / "deep", SD15_SCHEDULER_CONFIG)
    ours = load_pipeline(str(tmp_path / "deep"), device="cpu")
    assert ours.unet.config.transformer_depth == (1, 3)
    cls, override, steps, guidance = REFERENCE[sampler]
    ref.scheduler = cls.from_config({**SD15_SCHEDULER_CONFIG, **override})
    kw = {**SDXL_KW, "steps": steps, "guidance_scale": guidance}
    expected = sdxl_reference_images(ref, **kw)
    diff = max_diff(_ours(ours, sampler=sampler, **kw), expected)
    assert diff <= 2, f"{sampler}: max pixel difference {diff} > 2/255"
