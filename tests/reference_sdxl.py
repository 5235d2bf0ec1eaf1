"""A tiny random-weight diffusers StableDiffusionXLPipeline: the SDXL oracle of the tests.

Shaped like diffusers' own SDXL test components (tests/tiny.py's UNET_SDXL: 32 + 32-d
context, 32-d pooled vector, 6 time ids of 8 channels), with this project's tokenizers (the
bundled CLIP vocabulary; the second encoder pads with "!" as SDXL's tokenizer_2 does), the f=8
tiny VAE with SDXL's scaling factor, and force_zeros_for_empty_prompt as SDXL ships it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from model.checkpoint import SDXL_VAE_SCALING
from model.samplers import SD15_SCHEDULER_CONFIG
from model.text import bundled_tokenizer, tiny_text_config
from tests.reference import VAE_TINY
from tests.tiny import SDXL_POOLED_DIM, UNET_SDXL, UNET_SDXL_REFINER, randomize_

SDXL_TEXT_HIDDEN = 32  # both towers (their sum is UNET_SDXL's cross_attention_dim)

# The generate() call of the SDXL parity tests.
SDXL_KW: dict[str, Any] = {
    "prompt": "a red bicycle",
    "negative_prompt": "blurry",
    "steps": 6,
    "guidance_scale": 5.0,
    "width": 64,
    "height": 72,
    "seed": 4321,
    "num_images": 2,
}


def build_sdxl_reference(unet: dict[str, Any] | None = None) -> StableDiffusionXLPipeline:
    """The tiny SDXL base pipeline (or its encoders and VAE around another UNet config)."""
    net = randomize_(UNet2DConditionModel(**(unet or UNET_SDXL)), seed=31, scale=0.05)
    vae = randomize_(
        AutoencoderKL(**VAE_TINY, scaling_factor=SDXL_VAE_SCALING, force_upcast=True),
        seed=32,
        scale=0.05,
    )
    first = randomize_(CLIPTextModel(tiny_text_config(hidden=SDXL_TEXT_HIDDEN, layers=3)), seed=33)
    config_2 = tiny_text_config(hidden=SDXL_TEXT_HIDDEN, layers=3, hidden_act="gelu")
    config_2.projection_dim = SDXL_POOLED_DIM
    second = randomize_(CLIPTextModelWithProjection(config_2), seed=34)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=first.eval(),
        text_encoder_2=second.eval(),
        tokenizer=bundled_tokenizer(),
        tokenizer_2=bundled_tokenizer("!"),
        unet=net.eval(),
        scheduler=EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl_refiner(
    base: StableDiffusionXLPipeline, unet: dict[str, Any] | None = None
) -> StableDiffusionXLImg2ImgPipeline:
    """The tiny refiner: the base's bigG encoder and VAE, its own UNet, aesthetic time ids."""
    net = randomize_(UNet2DConditionModel(**(unet or UNET_SDXL_REFINER)), seed=35, scale=0.05)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=net.eval(),
        scheduler=base.scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,  # as the published refiner's model_index
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_reference_images(pipe: Any, **kw: Any) -> np.ndarray:
    """diffusers' images for generate()'s keywords, seeds as the noise convention says."""
    n, seed = kw.pop("num_images", 1), kw.pop("seed")
    for ours, theirs in (("steps", "num_inference_steps"), ("mask", "mask_image")):
        if ours in kw:
            kw[theirs] = kw.pop(ours)
    out = pipe(
        kw.pop("prompt"),
        prompt_2=kw.pop("prompt_2", None),
        negative_prompt=kw.pop("negative_prompt", None) or None,
        negative_prompt_2=kw.pop("negative_prompt_2", None),
        guidance_scale=kw.pop("guidance_scale"),
        num_images_per_prompt=n,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
        output_type="np",
        **kw,
    ).images
    return (out * 255).round().astype(np.uint8)
