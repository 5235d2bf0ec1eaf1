"""Tiny random-weight model configs shaped like SD 1.x, SD 2.x and SDXL, shared by the tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
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

# Heads per level that give no common head size (16, 16, 16, 24 channels per head): the
# diffusers SD folder issue 11 names.
UNET_IRREGULAR_HEADS: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [32, 64, 64, 96],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4, 4, 4],
    "norm_num_groups": 32,
}

# Every per-level knob at once: ResBlocks (1, 2, 1), transformer depths (1, 3, 2) down and
# other ones up, heads that do not divide the channels (3 heads of 10 over 32 channels),
# attention on different levels down (1) and up (0, 2): plain blocks at every position.
UNET_PER_LEVEL: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": [1, 2, 1],
    "transformer_layers_per_block": [1, 3, 2],
    "reverse_transformer_layers_per_block": [[2, 2], [1, 1, 1], [3, 3]],
    "cross_attention_dim": 24,
    "attention_head_dim": [3, 5, 4],
    "norm_num_groups": 16,
}

# diffusers' own tiny SDXL UNet (tests/pipelines/stable_diffusion_xl): "text_time" added
# embedding over a 32-d pooled vector and 6 time ids of 8 sinusoid channels each.
UNET_SDXL: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 80,  # 6 * 8 + 32
    "cross_attention_dim": 64,
    "norm_num_groups": 1,
}
SDXL_POOLED_DIM = 32  # the pooled text vector UNET_SDXL's added embedding takes

# diffusers' tiny SDXL refiner UNet: bigG's 32-d context only, 5 time ids (sizes, crop,
# aesthetic score) of 8 channels after the 32-d pooled vector.
UNET_SDXL_REFINER: dict[str, Any] = {
    **UNET_SDXL,
    "cross_attention_dim": 32,
    "projection_class_embeddings_input_dim": 72,  # 5 * 8 + 32
}

# SDXL conditioning over per-level depths (1, 3), attention at both levels and heads that
# share no size (3 of 10 over 32 channels, 5 of 12 over 64).
UNET_SDXL_DEEP: dict[str, Any] = {
    **UNET_SDXL,
    "down_block_types": ["CrossAttnDownBlock2D"] * 2,
    "up_block_types": ["CrossAttnUpBlock2D"] * 2,
    "transformer_layers_per_block": [1, 3],
    "attention_head_dim": [3, 5],
    "norm_num_groups": 16,
}

# The same SDXL shapes with what single files leave to convention: 64 channels per head and
# 32 norm groups (SDXL's), so the original-layout file of them loads as they are.
UNET_SDXL_SINGLE_FILE: dict[str, Any] = {
    **UNET_SDXL,
    "block_out_channels": [64, 128],
    "attention_head_dim": [1, 2],
    "norm_num_groups": 32,
}
UNET_SDXL_REFINER_SINGLE_FILE: dict[str, Any] = {
    **UNET_SDXL_SINGLE_FILE,
    "cross_attention_dim": UNET_SDXL_REFINER["cross_attention_dim"],
    "projection_class_embeddings_input_dim": UNET_SDXL_REFINER[
        "projection_class_embeddings_input_dim"
    ],
}

# A class-label table (the x4 upscaler's noise-level embedding has 1000 rows).
UNET_CLASSES: dict[str, Any] = {**UNET_SD2, "num_class_embeds": 1000}

# diffusers' tiny x4 upscaler UNet: 7 input channels (latents + the low-res image), a class
# table for the noise level, and first attentions that attend to the text (level 1 down and
# up; the middle block keeps self-attention). Its context is 48-d here, not 32 (= level 1's
# width), so that a single file of it tells cross- from self-attention by shape, as the real
# one (1024-d context, 512 channels) does.
UNET_X4: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 7,
    "out_channels": 4,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 48,
    "attention_head_dim": 8,
    "use_linear_projection": True,
    "only_cross_attention": [True, True, False],
    "num_class_embeds": 100,
}
# An irregular x4-style UNet: 6 channels (3 latent + RGB), three attention levels (one
# cross-only, at level 0), per-level heads, 16 norm groups, 400 noise-level classes.
UNET_X4_IRREGULAR: dict[str, Any] = {
    **UNET_X4,
    "sample_size": 16,
    "in_channels": 6,
    "out_channels": 3,
    "block_out_channels": [16, 48, 64],
    "layers_per_block": 1,
    "down_block_types": UNET_SD1["down_block_types"],
    "up_block_types": UNET_SD1["up_block_types"],
    "cross_attention_dim": 40,
    "attention_head_dim": [2, 4, 4],
    "only_cross_attention": [True, False, False],
    "num_class_embeds": 400,
    "norm_num_groups": 16,
}
# diffusers' tiny x4 VAE (f=4, attention in the decoder's mid block), and an irregular one.
VAE_X4: dict[str, Any] = {
    "block_out_channels": [32, 32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "latent_channels": 4,
    "scaling_factor": 0.08333,
}
VAE_X4_IRREGULAR: dict[str, Any] = {
    **VAE_X4,
    "block_out_channels": [16, 32, 48],
    "layers_per_block": 2,
    "latent_channels": 3,
    "norm_num_groups": 16,
}
# The x4's text encoder widths (= the UNets' context) and low-res schedules: the published
# folder's (linear in sqrt(beta), what a single file gets) and DDPMScheduler()'s linear betas,
# which diffusers' own test uses.
X4_TEXT_HIDDEN = {"test": UNET_X4["cross_attention_dim"], "irregular": 40}
X4_LOW_RES_SCHEDULERS: dict[str, dict[str, Any]] = {
    "test": {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02},
    "irregular": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
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


# diffusers VQModel configs: the shape of diffusers' own LDM pipeline tests (f=2), and an
# irregular one (f=4, three levels, 16 norm groups, vq_embed_dim != latent_channels).
VQ_TEST: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 3,
}
VQ_IRREGULAR: dict[str, Any] = {
    "block_out_channels": [16, 32, 48],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 2,
    "latent_channels": 4,
    "vq_embed_dim": 5,
    "num_vq_embeddings": 64,
    "norm_num_groups": 16,
    "scaling_factor": 0.7,
}
VQ_IRREGULAR_SR: dict[str, Any] = {**VQ_IRREGULAR, "latent_channels": 3, "vq_embed_dim": 3}
"""diffusers' super-resolution pipeline draws in_channels // 2 latent channels beside the RGB
low-res image, so an upscaler's latents have 3 channels."""

# diffusers UNet2DModel configs: diffusers' LDMPipeline / LDMSuperResolutionPipeline test UNets
# (in_channels 3 / 6), and an irregular three-level one with scale-shift time embedding.
UNET2D_UNCOND: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
UNET2D_SR: dict[str, Any] = {**UNET2D_UNCOND, "in_channels": 6}
UNET2D_IRREGULAR: dict[str, Any] = {
    "block_out_channels": [16, 32, 48],
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 5,
    "out_channels": 5,
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"],
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 4,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "downsample_padding": 0,
}
UNET2D_IRREGULAR_SR: dict[str, Any] = {**UNET2D_IRREGULAR, "in_channels": 6, "out_channels": 3}

# The same families in what CompVis LDM single files leave to convention (model/
# ldm_single_file.py): 32 channels per head (2 heads at 64), 32 norm groups everywhere, and an
# irregular shape: three levels, attention on levels 0 and 2 (1 and 3 heads), one res block per
# level, scale-shift time embedding (the mid attention keeps its norm, as openaimodel's).
UNET2D_UNCOND_SINGLE_FILE: dict[str, Any] = {**UNET2D_UNCOND, "attention_head_dim": 32}
UNET2D_SR_SINGLE_FILE: dict[str, Any] = {**UNET2D_SR, "attention_head_dim": 32}
UNET2D_IRREGULAR_SINGLE_FILE: dict[str, Any] = {
    **UNET2D_IRREGULAR,
    "block_out_channels": [32, 64, 96],
    "attention_head_dim": 32,
    "norm_num_groups": 32,
    "attn_norm_num_groups": 32,
    "freq_shift": 0,  # openaimodel's sinusoids, downsampling padding
    "flip_sin_to_cos": True,
    "downsample_padding": 1,
}
UNET2D_IRREGULAR_SR_SINGLE_FILE: dict[str, Any] = {
    **UNET2D_IRREGULAR_SINGLE_FILE,
    "in_channels": 6,
    "out_channels": 3,
}


BATCHING_SCHEDULER: dict[str, Any] = {
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.0005,
    "num_train_timesteps": 1000,
    "clip_sample": False,
}
"""A gentle noise schedule (alpha-bar stays above 0.8) for tests that compare batched with solo
images of VQ models: a random UNet predicts no noise, so under a real schedule its final
latents reach the thousands, where the rounding differences between batch sizes (relative
1e-6) can flip a near-tie codebook choice and move a patch of pixels (tests/
test_ldm_families.py shows such flips are near-ties). Here the latents stay small."""


def ldm_pipeline(kind: str) -> Any:
    """A tiny random-weight LDM pipeline built from our own modules (no diffusers): "uncond"
    (VQ_TEST + UNET2D_UNCOND) or "sr" (VQ_TEST + UNET2D_SR, a 2x upscaler), with a coarse
    16-entry codebook and BATCHING_SCHEDULER, for batching tests."""
    from model.pipeline import Pipeline
    from model.samplers import NoiseSchedule
    from model.unet2d import UNet2DModel, unet2d_config_from_diffusers
    from model.vq import VQAutoencoder
    from model.vq_convert import vq_config_from_diffusers

    unet_cfg = unet2d_config_from_diffusers(
        UNET2D_UNCOND if kind == "uncond" else UNET2D_SR, source="tiny"
    )
    vq_cfg = vq_config_from_diffusers({**VQ_TEST, "num_vq_embeddings": 16})
    if kind == "sr":  # the super-resolution pipeline decodes its latents unscaled
        vq_cfg = replace(vq_cfg, net=replace(vq_cfg.net, scaling_factor=1.0))
    vq = randomize_(VQAutoencoder(vq_cfg), seed=41, scale=0.1).eval().requires_grad_(False)
    unet = randomize_(UNet2DModel(unet_cfg), seed=42, scale=0.05).eval().requires_grad_(False)
    return Pipeline(
        unet=unet,
        vae=vq,
        text=None,
        schedule=NoiseSchedule.from_config(BATCHING_SCHEDULER),
        name=f"tiny-{kind}",
        native_size=unet_cfg.sample_size * vq.downsampling_factor,
        family="ldm" if kind == "uncond" else "ldm-sr",
    )


def x4_pipeline() -> Any:
    """A tiny random-weight x4 upscaler built from our own modules (no diffusers): UNET_X4,
    VAE_X4 and a 48-d OpenCLIP-style text encoder, the x4's schedules (checks, batching)."""
    from model.pipeline import Pipeline
    from model.samplers import NoiseSchedule
    from model.sd_upscale import X4_FAMILY, X4_SCHEDULER_CONFIG, LowResNoise
    from model.text import random_text_encoder, tiny_text_config
    from model.unet import UNetModel
    from model.unet_config_diffusers import unet_config_from_diffusers
    from model.vae import AutoencoderKL
    from model.vae_convert import vae_config_from_diffusers

    unet = UNetModel(unet_config_from_diffusers(UNET_X4, source="tiny"))
    vae = AutoencoderKL(vae_config_from_diffusers(VAE_X4, source="tiny"))
    text_cfg = tiny_text_config(hidden=X4_TEXT_HIDDEN["test"], hidden_act="gelu")
    return Pipeline(
        unet=randomize_(unet, seed=52, scale=0.05).eval().requires_grad_(False),
        vae=randomize_(vae, seed=51, scale=0.05).eval().requires_grad_(False),  # type: ignore[arg-type]
        text=random_text_encoder(text_cfg, seed=53),
        schedule=NoiseSchedule.from_config(X4_SCHEDULER_CONFIG),
        name="tiny-x4",
        native_size=128,
        family=X4_FAMILY,
        low_res_noise=LowResNoise.from_config(X4_LOW_RES_SCHEDULERS["test"]),
    )
