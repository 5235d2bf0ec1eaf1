"""Stability's x4 upscaler (stabilityai/stable-diffusion-x4-upscaler): the low-res noise
augmentation and what its folders and single files say, or leave to convention.

The UNet takes 7 channels: the 4 latents, then the low-res RGB image in [-1, 1] noised by its
own DDPM schedule to `noise_level`, which is also the UNet's class label (both CFG rows carry
the same noised image and label). The latents live at the low-res size; the f=4 KL VAE
decodes them (divided by its scaling 0.08333) to 4x the input. Prediction type v. As
diffusers' StableDiffusionUpscalePipeline, the input is resized (bicubic) down to multiples
of the VAE factor, and its noise is drawn before the initial latents, from the image's
generator.

A diffusers folder (model_index.json `_class_name` StableDiffusionUpscalePipeline) carries
`low_res_scheduler/scheduler_config.json` and `max_noise_level`. An original single file
(`x4-upscaler-ema.safetensors`: `model.diffusion_model.*` with `label_emb.weight`,
`first_stage_model.*`, `cond_stage_model.model.*` OpenCLIP) is told by its UNet's 7 input
channels and leaves these to the original config (Stability's `x4-upscaling.yaml`), used
here: VAE scaling 0.08333, v-prediction, both schedules linear in sqrt(beta) from 0.0001 to
0.02 over 1000 steps (the original's "linear" = diffusers' "scaled_linear"), max noise level
350, 8 heads per level (`num_heads: 8`; shapes cannot tell heads).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.schedules import NoiseSchedule
from model.unet_config import UNetConfig
from model.weight_files import read_json

log = logging.getLogger(__name__)

X4_FAMILY = "sd-x4-upscaler"
X4_CLASS_NAME = "StableDiffusionUpscalePipeline"
X4_VAE_SCALING = 0.08333  # diffusers' pipeline sets it whatever vae/config.json says
X4_IMAGE_CHANNELS = 3  # the low-res RGB image beside the latents
X4_NUM_HEADS = 8
DEFAULT_NOISE_LEVEL = 20  # diffusers' default
MAX_NOISE_LEVEL = 350  # diffusers' and the original config's default
X4_NATIVE_SIZE = 512  # 128-px inputs, the size it was trained at
LOW_RES_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
X4_SCHEDULER_CONFIG: dict[str, Any] = {
    **LOW_RES_SCHEDULER_CONFIG,
    "prediction_type": "v_prediction",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
"""The sampling schedule a single file gets (the published folder's scheduler config)."""
_BETA_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas")


@dataclass(frozen=True)
class LowResNoise:
    """The low-res image's noise augmentation: its DDPM schedule and the largest level."""

    alphas_cumprod: tuple[float, ...]
    max_noise_level: int = MAX_NOISE_LEVEL

    @classmethod
    def from_config(
        cls, cfg: dict[str, Any] | None = None, max_noise_level: int = MAX_NOISE_LEVEL
    ) -> LowResNoise:
        """From a `low_res_scheduler` config (None: the original x4's schedule)."""
        given = {k: v for k, v in (cfg or {}).items() if k in _BETA_KEYS}  # only add_noise runs
        acp = NoiseSchedule.from_config({**LOW_RES_SCHEDULER_CONFIG, **given}).alphas_cumprod
        if not 0 <= max_noise_level < len(acp):
            raise ValueError(f"max_noise_level {max_noise_level} is outside the schedule's steps")
        return cls(acp, int(max_noise_level))

    def within(self, num_classes: int | None) -> LowResNoise:
        """Levels the UNet's class table can embed (a table of n rows: at most n - 1)."""
        if num_classes is None or self.max_noise_level < num_classes:
            return self
        log.warning("max_noise_level %d lowered to %d: the UNet embeds %d noise levels",
                    self.max_noise_level, num_classes - 1, num_classes)  # fmt: skip
        return replace(self, max_noise_level=num_classes - 1)

    def level(self, noise_level: int | None) -> int:
        """The level a request asks for (None: the default); ValueError outside 0..max."""
        level = DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
        if not 0 <= level <= self.max_noise_level:
            raise ValueError(f"noise_level must be in 0..{self.max_noise_level}, got {level}")
        return level

    def noised(self, image: Tensor, level: int, generator: torch.Generator) -> Tensor:
        """q(x_level | x_0) of (1, 3, h, w) pixels, the noise drawn from the image's generator
        (float32, as DDPMScheduler.add_noise computes it)."""
        noise = torch.randn(image.shape, generator=generator, dtype=torch.float32)
        a = torch.tensor(self.alphas_cumprod[level], dtype=torch.float32)
        return a**0.5 * image.float().cpu() + (1 - a) ** 0.5 * noise  # (1, 3, h, w)

    @staticmethod
    def labels(level: int) -> Tensor:
        """The UNet's class label of one row: the noise level."""
        return torch.tensor([level], dtype=torch.long)


def is_x4_folder(folder: Path) -> bool:
    """A StableDiffusionUpscalePipeline folder (its model_index says so, or it has the
    low-res scheduler only it carries)."""
    index = read_json(folder / "model_index.json")
    return index.get("_class_name") == X4_CLASS_NAME or (folder / "low_res_scheduler").is_dir()


def x4_folder_noise(folder: Path) -> LowResNoise:
    """The folder's low-res schedule and `max_noise_level` (defaults where it has none)."""
    index = read_json(folder / "model_index.json")
    path = folder / "low_res_scheduler" / "scheduler_config.json"
    cfg = read_json(path) if path.is_file() else None
    if cfg is None:
        log.warning("%s: no low_res_scheduler config; using the x4 upscaler's schedule", folder)
    return LowResNoise.from_config(cfg, int(index.get("max_noise_level", MAX_NOISE_LEVEL)))


def is_x4_unet(in_channels: int, latent_channels: int) -> bool:
    """A UNet taking the latents and the low-res RGB image (the x4 upscaler's 7 channels)."""
    return in_channels == latent_channels + X4_IMAGE_CHANNELS


def x4_single_file_unet(config: UNetConfig) -> UNetConfig:
    """A single file's detected UNet with the heads its shapes cannot tell (8 per level)."""
    return replace(config, num_heads=X4_NUM_HEADS, head_dim=None)
