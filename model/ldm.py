"""The LDM paper's text-free families from diffusers folders: unconditional (LDMPipeline,
CompVis/ldm-celebahq-256) and super-resolution (LDMSuperResolutionPipeline,
CompVis/ldm-super-resolution-4x-openimages) — a VQ first stage (`vqvae/`) and a UNet2DModel
(`unet/`), no text encoder.

What the folders leave implicit follows the diffusers pipelines: the unconditional pipeline
divides final latents by the VQ config's `scaling_factor` before decoding, the
super-resolution pipeline decodes them as they are (scaling 1 here), and its UNet takes the
low-res RGB image as 3 extra input channels, so it is told apart by `in_channels`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from model.pipeline import Pipeline
from model.samplers import NoiseSchedule
from model.unet import prefers_channels_last
from model.unet2d import UNet2DModel, unet2d_config_from_diffusers, unet2d_state_dict_from_diffusers
from model.vq_convert import vq_config_from_diffusers, vq_from_diffusers
from model.weight_files import WeightFile, find_weights, read_json
from model.weights import CheckpointError, build_module

log = logging.getLogger(__name__)

LDM_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
}
"""The CompVis LDM training schedule (linear in sqrt(beta)), for folders without a scheduler
config; the published folders carry DDIM configs over it."""


def is_ldm_folder(folder: Path) -> bool:
    """A diffusers folder of the text-free LDM families: a `vqvae/` and no text encoder."""
    return (folder / "vqvae").is_dir() and not (folder / "text_encoder").is_dir()


def load_ldm_folder(
    folder: Path, device: torch.device, dtype: torch.dtype, name: str | None = None
) -> Pipeline:
    """An LDMPipeline or LDMSuperResolutionPipeline folder: unet/, vqvae/, scheduler/."""
    unet_dir = folder / "unet"
    unet_cfg = unet2d_config_from_diffusers(
        read_json(unet_dir / "config.json"), source=str(unet_dir)
    )
    vq_cfg = vq_config_from_diffusers(
        read_json(folder / "vqvae" / "config.json"), source=str(folder)
    )
    latent = vq_cfg.net.embed_dim
    upscaler = unet_cfg.in_channels == latent + 3
    if not upscaler and unet_cfg.in_channels != latent:
        raise CheckpointError(
            f"{folder}: the UNet takes {unet_cfg.in_channels} channels; the VQ latents have "
            f"{latent} (unconditional) or {latent} + 3 with the low-res image (super-resolution)"
        )
    weights = WeightFile(find_weights(unet_dir, "diffusion_pytorch_model"))
    nhwc = prefers_channels_last(device)  # read conv weights NHWC once (see Pipeline)
    raw = weights.read(list(weights.shapes()), device=device, dtype=dtype, channels_last=nhwc)
    unet = build_module(
        lambda: UNet2DModel(unet_cfg),
        unet2d_state_dict_from_diffusers(raw),
        what="UNet",
        source=str(weights.path),
        device=device,
        dtype=dtype,
    )
    del raw
    vq = vq_from_diffusers(
        folder / "vqvae", device=device, dtype=dtype, scaling_factor=1.0 if upscaler else None
    )
    sched_path = folder / "scheduler" / "scheduler_config.json"
    schedule = NoiseSchedule.from_config(
        read_json(sched_path) if sched_path.is_file() else LDM_SCHEDULER_CONFIG
    )
    family = "ldm-sr" if upscaler else "ldm"
    log.info("loaded %s folder %s on %s/%s", family, folder, device, dtype)
    return Pipeline(
        unet=unet,
        vae=vq,
        text=None,
        schedule=schedule,
        name=name or folder.name,
        native_size=unet_cfg.sample_size * vq.downsampling_factor,
        family=family,
    )
