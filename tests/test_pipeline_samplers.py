"""Every sampler through the full generate(): equal to diffusers' StableDiffusionPipeline
with the scheduler DESIGN.md maps it to, on tiny SD 1.x (epsilon) and SD 2.x
(v_prediction) shaped models, fp32, same seeds.

The saved folders carry the scheduler config the published SD 1.5 / 2.1 folders carry:
no `timestep_spacing`, so each sampler uses its scheduler's own default, exactly as
`Scheduler.from_config(SD15_SCHEDULER_CONFIG)` does. (Current diffusers writes the DDIM
default "leading" into the file on save; a folder that names a spacing is tested apart.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from model.samplers import SAMPLER_NAMES, SD15_SCHEDULER_CONFIG
from tests.reference import FAMILIES, build_reference, reference_images

# sampler -> (diffusers scheduler class, config override, steps, guidance scale)
REFERENCE: dict[str, tuple[type, dict[str, Any], int, float]] = {
    "ddim": (DDIMScheduler, {}, 8, 7.5),
    "euler": (EulerDiscreteScheduler, {}, 8, 7.5),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, 8, 7.5),
    "heun": (HeunDiscreteScheduler, {}, 6, 7.5),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}, 8, 7.5),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, 8, 7.5),
    "lcm": (LCMScheduler, {}, 4, 1.0),  # as LCM is used: few steps, no CFG
    "pndm": (PNDMScheduler, {}, 8, 7.5),
}
Models = tuple[StableDiffusionPipeline, Pipeline, str, Path]
REQUEST: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "blurry, low quality",
    "width": 64,
    "height": 72,
    "seed": 77,
    "num_images": 2,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Models:
    """The diffusers oracle and ours loaded from its saved folder, once per family."""
    ref = build_reference(request.param)
    ref.set_progress_bar_config(disable=True)
    prediction = FAMILIES[request.param]["pred"]
    folder: Path = tmp_path_factory.mktemp(request.param) / "pipeline"
    ref.save_pretrained(folder, safe_serialization=True)
    write_scheduler_config(folder, {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction})
    return ref, load_pipeline(str(folder), device="cpu"), prediction, folder


def write_scheduler_config(folder: Path, cfg: dict[str, Any]) -> None:
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "DDIMScheduler", **cfg}, indent=2))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_sampler_table_covers_every_name() -> None:
    assert set(REFERENCE) == set(SAMPLER_NAMES)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_generate_matches_diffusers(models: Models, sampler: str) -> None:
    ref, ours, prediction, _ = models
    cls, override, steps, guidance = REFERENCE[sampler]
    ref.scheduler = cls.from_config(
        {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction, **override}
    )
    kw = {**REQUEST, "steps": steps, "guidance_scale": guidance}
    expected = reference_images(ref, **dict(kw))
    got = np.stack([np.asarray(im) for im in ours.generate(sampler=sampler, **kw)])
    assert got.shape == expected.shape == (2, 72, 64, 3)
    diff = max_diff(got, expected)
    assert diff <= 2, f"{sampler} ({prediction}): max pixel difference {diff} > 2/255"
    assert max_diff(got[0], got[1]) > 10, "images of seeds s and s+1 must differ"


def test_timestep_spacing_named_by_the_folder(models: Models, tmp_path: Path) -> None:
    """A spacing the folder's scheduler config names (as diffusers now saves them) overrides the
    sampler's own default, as `EulerDiscreteScheduler.from_pretrained(folder)` does in
    diffusers: "leading" here, where Euler's default is "linspace"."""
    ref, _, prediction, folder = models
    copy = tmp_path / "pipeline"
    shutil.copytree(folder, copy)
    cfg = {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction, "timestep_spacing": "leading"}
    write_scheduler_config(copy, cfg)
    ours = load_pipeline(str(copy), device="cpu")
    ref.scheduler = EulerDiscreteScheduler.from_pretrained(copy / "scheduler")
    assert ref.scheduler.config.timestep_spacing == "leading"
    kw = {**REQUEST, "steps": 6, "guidance_scale": 7.5, "num_images": 1}
    expected = reference_images(ref, **dict(kw))
    got = np.stack([np.asarray(im) for im in ours.generate(sampler="euler", **kw)])
    assert max_diff(got, expected) <= 2


def test_every_name_accepted_and_unknown_rejected(models: Models) -> None:
    _, ours, _, _ = models
    small = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "guidance_scale": 1.0}
    for name in SAMPLER_NAMES:
        (image,) = ours.generate(sampler=name, **small)
        assert image.size == (64, 64), name
    with pytest.raises(GenerationError, match="unknown sampler 'nope'"):
        ours.generate(sampler="nope", **small)


def test_service_sampler_names_mirror_model() -> None:
    from service.contract import SAMPLER_NAMES as SERVICE_NAMES

    assert SERVICE_NAMES == SAMPLER_NAMES
