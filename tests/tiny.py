"""Tiny random-weight model configs shaped like SD 1.x and SD 2.x, shared by the tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

# diffusers UNet2DConditionModel configs; ours are derived from them by the loader.
UNET_SD1: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

UNET_SD2: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 48,
    "attention_head_dim": [2, 4, 4],  # 16 channels per head at every level, as SD 2.x's 64
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 16,
}


def randomize_(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Give every parameter distinct random values, so swapped weights cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            if name.endswith("weight") and p.ndim == 1:  # norms: around 1
                noise += 1.0
            p.copy_(noise)
    return module


def demo_inpainting_pipeline() -> Any:
    """The demo model's VAE and text encoder with a 9-channel (inpainting) demo-sized UNet."""
    from dataclasses import replace

    from model.demo import DEMO_UNET, build_demo
    from model.pipeline import Pipeline
    from model.unet import UNetModel

    base = build_demo()
    unet = randomize_(UNetModel(replace(DEMO_UNET, in_channels=9)), seed=9, scale=0.05).eval()
    return Pipeline(
        unet=unet.requires_grad_(False),
        vae=base.vae,
        text=base.text,
        schedule=base.schedule,
        name="demo-inpainting",
        native_size=base.native_size,
        family="demo",
    )


def demo_solo(**generate_kwargs: Any) -> list[np.ndarray]:
    """The images the demo model gives for these generation fields alone, in this process:
    what a compatible API's answer must decode to (the demo weights depend only on a seed)."""
    from model import load_pipeline

    pipe = load_pipeline("demo", device="cpu")
    return [np.asarray(im.convert("RGB")) for im in pipe.generate(**generate_kwargs)]


def max_pixel_diff(images: Sequence[Any], expected: Sequence[np.ndarray]) -> int:
    """Largest |difference| (of 255) between decoded images (PIL) and expected arrays."""
    assert len(images) == len(expected)
    got = [np.asarray(im.convert("RGB")).astype(int) for im in images]
    return max(int(np.abs(g - e.astype(int)).max()) for g, e in zip(got, expected, strict=True))
