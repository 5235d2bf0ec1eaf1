"""A tiny random-weight diffusers StableDiffusionUpscalePipeline (the x4 upscaler's oracle) in
the shape of diffusers' own test for it, or an irregular one, and its saved folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel

from model.sd_upscale import X4_SCHEDULER_CONFIG
from model.text import bundled_tokenizer, tiny_text_config
from tests.tiny import (
    UNET_X4,
    UNET_X4_IRREGULAR,
    VAE_X4,
    VAE_X4_IRREGULAR,
    X4_LOW_RES_SCHEDULERS,
    X4_TEXT_HIDDEN,
    randomize_,
)

X4_SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "test": (VAE_X4, UNET_X4),
    "irregular": (VAE_X4_IRREGULAR, UNET_X4_IRREGULAR),
}


def build_x4_reference(shape: str = "test") -> StableDiffusionUpscalePipeline:
    """The tiny diffusers upscale pipeline: OpenCLIP-style (gelu, pad '!') text encoder, the
    published folder's sampling scheduler, the shape's low-res scheduler."""
    vae_cfg, unet_cfg = X4_SHAPES[shape]
    vae = randomize_(AutoencoderKL(**vae_cfg), seed=51, scale=0.05).eval()
    unet = randomize_(UNet2DConditionModel(**unet_cfg), seed=52, scale=0.05).eval()
    text_cfg = tiny_text_config(hidden=X4_TEXT_HIDDEN[shape], layers=2, hidden_act="gelu")
    text = randomize_(CLIPTextModel(text_cfg), seed=53).eval()
    ref = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=bundled_tokenizer("!"),
        unet=unet,
        low_res_scheduler=DDPMScheduler(**X4_LOW_RES_SCHEDULERS[shape]),
        scheduler=DDIMScheduler.from_config(X4_SCHEDULER_CONFIG),
        max_noise_level=350,
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def save_x4_reference(ref: StableDiffusionUpscalePipeline, folder: Path) -> Path:
    """The diffusers folder; its scheduler config is the published folder's (DDIM)."""
    ref.save_pretrained(folder, safe_serialization=True)
    config = {"_class_name": "DDIMScheduler", **X4_SCHEDULER_CONFIG}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def low_res_input(width: int, height: int, seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def x4_reference_images(
    ref: StableDiffusionUpscalePipeline, image: Image.Image, seed: int, n: int, **kw: Any
) -> np.ndarray:
    """diffusers' images i = 0..n-1, each from its own call with Generator(seed + i) (the noise
    convention: image i of seed s is image 0 of seed s + i), uint8 (n, H, W, 3)."""
    out = []
    for i in range(n):
        gens = [torch.Generator("cpu").manual_seed(seed + i)]
        images = ref(image=image, generator=gens, output_type="np", **kw).images
        out.append(images)
    return (np.concatenate(out) * 255).round().astype(np.uint8)
