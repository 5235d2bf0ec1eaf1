"""A tiny random-weight diffusers StableDiffusionPipeline: the oracle the tests compare with."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from model.samplers import SD15_SCHEDULER_CONFIG
from model.text import bundled_tokenizer, tiny_text_config
from tests.tiny import UNET_SD1, UNET_SD2, randomize_

VAE_TINY: dict[str, Any] = {
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
}

# The generate() call of the pipeline parity tests: DDIM 10 steps, CFG 7.5, two seeds.
PARITY_KW: dict[str, Any] = {
    "prompt": "a red bicycle",
    "negative_prompt": "blurry",
    "steps": 10,
    "guidance_scale": 7.5,
    "width": 64,
    "height": 72,
    "seed": 1234,
    "num_images": 2,
}

FAMILIES: dict[str, dict[str, Any]] = {
    "sd1": {
        "unet": UNET_SD1,
        "hidden": 32,
        "act": "quick_gelu",
        "pad": "<|endoftext|>",
        "pred": "epsilon",
    },
    "sd2": {"unet": UNET_SD2, "hidden": 48, "act": "gelu", "pad": "!", "pred": "v_prediction"},
}


def build_reference(family: str, unet: dict[str, Any] | None = None) -> StableDiffusionPipeline:
    """A tiny random-weight diffusers pipeline of the family's shape (or its text encoder and
    VAE around another UNet config)."""
    spec = FAMILIES[family]
    unet_cfg = spec["unet"] if unet is None else unet
    net = randomize_(
        UNet2DConditionModel(**{**unet_cfg, "cross_attention_dim": spec["hidden"]}),
        seed=11,
        scale=0.05,
    )
    vae = randomize_(AutoencoderKL(**VAE_TINY), seed=12, scale=0.05)
    text = randomize_(
        CLIPTextModel(tiny_text_config(hidden=spec["hidden"], layers=2, hidden_act=spec["act"])),
        seed=13,
    )
    sched = DDIMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": spec["pred"]})
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=bundled_tokenizer(spec["pad"]),
        unet=net.eval(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def reference_images(pipe: StableDiffusionPipeline, **kw: Any) -> np.ndarray:
    n = kw.pop("num_images", 1)
    seed = kw.pop("seed")
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    out = pipe(
        kw.pop("prompt"),
        negative_prompt=kw.pop("negative_prompt", None) or None,
        num_inference_steps=kw.pop("steps"),
        guidance_scale=kw.pop("guidance_scale"),
        width=kw.pop("width"),
        height=kw.pop("height"),
        num_images_per_prompt=n,
        generator=gens,
        output_type="np",
    ).images
    return (out * 255).round().astype(np.uint8)
