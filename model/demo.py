"""The built-in demo model: tiny random weights from a fixed seed, SD-shaped, ready in a second.

It exercises every part of the service (text encoder, UNet with cross-attention, f=8 VAE,
every sampler) without a checkpoint; its images are noise. The weights depend only on the
seed, so every process that loads "demo" gets the same model and the same images.
"""

from __future__ import annotations

import torch

from model.pipeline import Pipeline
from model.samplers import SD15_SCHEDULER_CONFIG, NoiseSchedule
from model.text import random_text_encoder, tiny_text_config
from model.unet import UNetModel
from model.unet_config import UNetConfig
from model.vae import TINY_VAE_CONFIG, AutoencoderKL

DEMO_SEED = 20221220  # any fixed number: the demo model's identity
DEMO_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_heads=4,
    context_dim=32,
)
DEMO_TEXT_HIDDEN = 32


def build_demo(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Pipeline:
    """Build the demo pipeline (deterministic: same weights in every process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        unet = UNetModel(DEMO_UNET)
        vae = AutoencoderKL(TINY_VAE_CONFIG)
    text = random_text_encoder(
        tiny_text_config(hidden=DEMO_TEXT_HIDDEN, layers=2),
        seed=DEMO_SEED,
        device=device,
        dtype=dtype,
    )
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Pipeline(
        unet=unet,
        vae=vae,
        text=text,
        schedule=NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG),
        name="demo",
        native_size=256,
        family="demo",
    )
