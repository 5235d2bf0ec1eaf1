"""img2img and inpainting through generate(): equal to diffusers' StableDiffusionImg2ImgPipeline
and StableDiffusionInpaintPipeline (9-channel UNet, and the 4-channel blend path) on tiny SD 1.x
(epsilon) and SD 2.x (v_prediction) shaped models, every sampler, fp32, same seeds.

diffusers' inpainting pipeline encodes the source and masked image once with the first
generator for all images of a call, while ldmserve draws per image; so inpainting parity is
checked one image per call (image i of seed s is image 0 of seed s + i, tested apart).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from model import load_pipeline
from model.pipeline import GenerationError, Pipeline
from model.samplers import SAMPLER_NAMES, SD15_SCHEDULER_CONFIG
from tests.reference import FAMILIES, build_reference
from tests.test_pipeline_samplers import REFERENCE, max_diff, write_scheduler_config
from tests.tiny import randomize_

W, H = 64, 72
BASE: dict[str, Any] = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry"}


def source_image(width: int = W, height: int = H, seed: int = 5) -> Image.Image:
    """A smooth colourful picture with some texture (a VAE input that is not flat)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [128 + 100 * np.sin(xx / 9), 128 + 100 * np.cos(yy / 7), 255 * xx / width], axis=-1
    )
    rgb += rng.normal(0, 12, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def hard_mask(width: int = W, height: int = H) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m, "L")


def soft_mask(width: int = W, height: int = H) -> Image.Image:
    """A grey ramp: diffusers' mask processor binarises it at 0.5, and so must we."""
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.float32), (height, 1))
    return Image.fromarray(ramp.astype(np.uint8), "L")


Models = tuple[StableDiffusionPipeline, Pipeline, str]


def _load(ref: StableDiffusionPipeline, folder: Path, prediction: str) -> Pipeline:
    ref.save_pretrained(folder, safe_serialization=True)
    write_scheduler_config(folder, {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction})
    return load_pipeline(str(folder), device="cpu")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Models:
    ref = build_reference(request.param)
    ref.set_progress_bar_config(disable=True)
    pred = FAMILIES[request.param]["pred"]
    return ref, _load(ref, tmp_path_factory.mktemp(request.param) / "p", pred), pred


def _inpaint_pair(family: str, folder: Path) -> Models:
    """The family's tiny model with a 9-channel inpainting UNet (latents + mask + masked
    latents): the diffusers oracle and ours loaded from its saved folder."""
    ref = build_reference(family)
    spec = FAMILIES[family]
    cfg = {**spec["unet"], "cross_attention_dim": spec["hidden"], "in_channels": 9}
    unet = randomize_(UNet2DConditionModel(**cfg), seed=21, scale=0.05).eval()
    ref = StableDiffusionPipeline(**{**ref.components, "unet": unet})
    ref.set_progress_bar_config(disable=True)
    return ref, _load(ref, folder, spec["pred"]), spec["pred"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def inpaint_models(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Models:
    return _inpaint_pair(request.param, tmp_path_factory.mktemp(request.param) / "inp")


def _scheduler(ref: Any, sampler: str, prediction: str) -> None:
    cls, override, _, _ = REFERENCE[sampler]
    ref.scheduler = cls.from_config(
        {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction, **override}
    )


def _run_ref(pipe: Any, n: int, seed: int, **kw: Any) -> np.ndarray:
    gens = [__import__("torch").Generator("cpu").manual_seed(seed + i) for i in range(n)]
    out = pipe(num_images_per_prompt=n, generator=gens, output_type="np", **kw).images
    return (out * 255).round().astype(np.uint8)


def _ours(pipe: Pipeline, **kw: Any) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe.generate(**kw)])


def _ref_kw(sampler: str, steps: int | None = None) -> tuple[int, float]:
    _, _, default_steps, guidance = REFERENCE[sampler]
    return steps or default_steps, guidance


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(models: Models, sampler: str, strength: float) -> None:
    ref, ours, pred = models
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    _scheduler(img2img, sampler, pred)
    steps, guidance = _ref_kw(sampler)
    image = source_image()
    expected = _run_ref(
        img2img, 2, 31, prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"],
        image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
    )  # fmt: skip
    got = _ours(
        ours, **BASE, image=image, strength=strength, steps=steps, guidance_scale=guidance,
        sampler=sampler, seed=31, num_images=2,
    )  # fmt: skip
    assert got.shape == expected.shape == (2, H, W, 3)
    diff = max_diff(got, expected)
    assert diff <= 2, f"img2img {sampler} ({pred}) strength {strength}: max diff {diff}"
    assert max_diff(got, np.asarray(image)[None]) > 10, "the image must have been changed"


@pytest.mark.parametrize(("sampler", "steps", "strength"), [
    ("ddim", 7, 0.3), ("euler_a", 7, 0.55), ("heun", 5, 0.45), ("dpmpp_2m", 9, 0.35),
    ("pndm", 7, 0.75), ("lcm", 5, 0.5), ("dpmpp_2m_karras", 3, 0.5),
])  # fmt: skip
def test_img2img_odd_strengths(models: Models, sampler: str, steps: int, strength: float) -> None:
    """Strengths whose steps × strength is not whole (int() rounds down, as diffusers)."""
    ref, ours, pred = models
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    _scheduler(img2img, sampler, pred)
    _, guidance = _ref_kw(sampler)
    image = source_image(70, 75)  # rounded down to 64 x 72, resized with Lanczos as diffusers
    expected = _run_ref(
        img2img, 1, 8, prompt=BASE["prompt"], image=image, strength=strength,
        num_inference_steps=steps, guidance_scale=guidance,
    )  # fmt: skip
    got = _ours(ours, prompt=BASE["prompt"], image=image, strength=strength, steps=steps,
                guidance_scale=guidance, sampler=sampler, seed=8)  # fmt: skip
    assert got.shape == (1, 72, 64, 3)
    assert max_diff(got, expected) <= 2


def _inpaint_ref(ref: StableDiffusionPipeline, sampler: str, pred: str) -> Any:
    pipe = StableDiffusionInpaintPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    _scheduler(pipe, sampler, pred)
    return pipe


def _check_inpaint(ref: StableDiffusionPipeline, ours: Pipeline, pred: str, sampler: str,
                   strength: float, mask: Image.Image) -> np.ndarray:  # fmt: skip
    pipe = _inpaint_ref(ref, sampler, pred)
    steps, guidance = _ref_kw(sampler)
    image = source_image()
    expected = _run_ref(
        pipe, 1, 44, prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"], image=image,
        mask_image=mask, width=W, height=H, strength=strength, num_inference_steps=steps,
        guidance_scale=guidance,
    )  # fmt: skip
    got = _ours(
        ours, **BASE, image=image, mask=mask, strength=strength, steps=steps,
        guidance_scale=guidance, sampler=sampler, seed=44,
    )  # fmt: skip
    diff = max_diff(got, expected)
    assert diff <= 2, f"inpaint {sampler} ({pred}) strength {strength}: max diff {diff}"
    return got


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_unet_matches_diffusers(
    inpaint_models: Models, sampler: str, strength: float
) -> None:
    ref, ours, pred = inpaint_models
    assert ours.capabilities.modes == ("inpaint",)
    _check_inpaint(ref, ours, pred, sampler, strength, hard_mask())


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_inpainting_soft_mask_matches_diffusers(inpaint_models: Models, sampler: str) -> None:
    ref, ours, pred = inpaint_models
    _check_inpaint(ref, ours, pred, sampler, 0.8, soft_mask())


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_blend_inpainting_matches_diffusers(models: Models, sampler: str, strength: float) -> None:
    """A 4-channel model with a mask: diffusers' blend path of the same pipeline."""
    ref, ours, pred = models
    got = _check_inpaint(ref, ours, pred, sampler, strength, hard_mask())
    image = np.asarray(source_image()).astype(int)
    keep = np.asarray(hard_mask()) < 128
    changed = np.abs(got[0].astype(int) - image).max(axis=-1)
    assert changed[~keep].mean() > changed[keep].mean(), "the masked area must change most"


def test_keep_unmasked_keeps_the_source_pixels_exactly(models: Models) -> None:
    _, ours, _ = models
    image, mask = source_image(), hard_mask()
    kw = {**BASE, "image": image, "mask": mask, "steps": 4, "sampler": "ddim", "seed": 3}
    plain = _ours(ours, **kw)[0]
    kept = _ours(ours, **kw, keep_unmasked=True)[0]
    keep = np.asarray(mask) < 128
    np.testing.assert_array_equal(kept[keep], np.asarray(image)[keep])
    np.testing.assert_array_equal(kept[~keep], plain[~keep])
    assert max_diff(plain[keep][None], np.asarray(image)[keep][None]) > 0


def test_inpainting_image_i_is_image_0_of_seed_plus_i(inpaint_models: Models) -> None:
    _, ours, _ = inpaint_models
    kw = {**BASE, "image": source_image(), "mask": hard_mask(), "steps": 3, "sampler": "euler_a"}
    both = _ours(ours, **kw, seed=10, num_images=2)
    # Same noise, same latents; the two images are decoded as one batch of two, and the CPU's
    # channels_last convolutions round a batch of two slightly differently from one image.
    assert max_diff(both[1], _ours(ours, **kw, seed=11)[0]) <= 1
    assert max_diff(both[0], both[1]) > 10


def test_image_mode_errors_name_the_parameter(models: Models, inpaint_models: Models) -> None:
    _, ours, _ = models
    _, inpainter, _ = inpaint_models
    image = source_image()
    cases = [
        (ours, {"mask": hard_mask()}, "mask", "needs an image"),
        (ours, {"image": image, "mask": hard_mask(32, 32)}, "mask", "same size"),
        (ours, {"image": image, "strength": 0.0}, "strength", r"in \(0, 1\]"),
        (ours, {"image": image, "strength": 1.5}, "strength", r"in \(0, 1\]"),
        (ours, {"image": image, "strength": 0.1, "steps": 4}, "strength", "leaves no step"),
        (ours, {"strength": 0.5}, "strength", "needs an image"),
        (inpainter, {}, "image", "cannot run txt2img"),
        (inpainter, {"image": image}, "mask", "cannot run img2img"),
    ]
    for pipe, extra, field, message in cases:
        with pytest.raises(GenerationError, match=message) as err:
            pipe.generate("x", width=W, height=H, **{"steps": 4, **extra})
        assert err.value.field == field, (extra, err.value.field)


def test_single_file_inpainting_checkpoint_loads_and_agrees(tmp_path: Path) -> None:
    """An original-layout single file of a 9-channel SD 1.x model (detected from conv_in's
    shape) gives the images its diffusers folder gives. (SD 1.x only: writing an SD 2.x
    OpenCLIP text tower back to the original layout is not implemented.)"""
    from safetensors.torch import save_file

    from model.text_ldm import text_state_dict_to_ldm
    from model.unet_convert import unet_state_dict_to_ldm
    from model.vae_convert import vae_state_dict_to_ldm

    _, folder_pipe, _ = _inpaint_pair("sd1", tmp_path / "folder")
    sd = {
        **unet_state_dict_to_ldm(folder_pipe.unet),
        **vae_state_dict_to_ldm(folder_pipe.vae),
        **text_state_dict_to_ldm(folder_pipe.text),
    }
    path = tmp_path / "inpainting.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    single = load_pipeline(str(path), device="cpu")
    assert single.unet.config.in_channels == 9 and single.capabilities.modes == ("inpaint",)
    kw = {**BASE, "image": source_image(), "mask": hard_mask(), "steps": 4, "sampler": "ddim"}
    np.testing.assert_array_equal(_ours(single, **kw, seed=2), _ours(folder_pipe, **kw, seed=2))


def test_img2img_does_not_depend_on_the_thread_count(models: Models) -> None:
    """Workers run with their own thread counts: an img2img trajectory starts from the VAE
    encoding, which must not round differently with the number of threads."""
    _, ours, _ = models
    kw = {**BASE, "image": source_image(), "mask": hard_mask(), "steps": 2, "strength": 0.5,
          "sampler": "euler_a", "seed": 3}  # fmt: skip
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _ours(ours, **kw)
        torch.set_num_threads(1)
        one = _ours(ours, **kw)
    finally:
        torch.set_num_threads(before)
    assert max_diff(two, one) <= 1
