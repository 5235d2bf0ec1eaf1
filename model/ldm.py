"""The LDM paper's own families from diffusers folders: unconditional (LDMPipeline,
CompVis/ldm-celebahq-256) and super-resolution (LDMSuperResolutionPipeline,
CompVis/ldm-super-resolution-4x-openimages) — a VQ first stage (`vqvae/`) and a UNet2DModel
(`unet/`), no text encoder — and text-to-image (LDMTextToImagePipeline,
CompVis/ldm-text2im-large-256: a KL autoencoder in `vqvae/`, LDMBert in `bert/` with its BERT
`tokenizer/`, a UNet2DConditionModel).

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

LDM_SR_SCHEDULER_CONFIG: dict[str, Any] = {**LDM_SCHEDULER_CONFIG, "beta_end": 0.0155}
"""The super-resolution model's training schedule (`models/ldm/bsr_sr/config.yaml`: linear_end
0.0155), for its single files without a `betas` buffer; LDM_SCHEDULER_CONFIG is celebahq's."""

LDM_TEXT2IM_SCHEDULER_CONFIG: dict[str, Any] = {
    **LDM_SCHEDULER_CONFIG,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "set_alpha_to_one": False,
}
"""txt2img-f8-large's (`txt2img-1p4B-eval.yaml`: linear_start 0.00085, linear_end 0.012), for
its single files without `betas`; the last DDIM step goes to alpha-bar[0], as CompVis' DDIM
sampler (and diffusers' set_alpha_to_one=False) does."""


def is_ldm_folder(folder: Path) -> bool:
    """A diffusers folder of the text-free LDM families: a `vqvae/` and no text encoder."""
    return (
        (folder / "vqvae").is_dir()
        and not (folder / "text_encoder").is_dir()
        and not (folder / "bert").is_dir()
    )


def is_ldm_text_folder(folder: Path) -> bool:
    """An LDMTextToImagePipeline folder: `bert/` and `vqvae/`."""
    return (folder / "bert").is_dir() and (folder / "vqvae").is_dir()


def load_ldm_text_folder(
    folder: Path, device: torch.device, dtype: torch.dtype, name: str | None = None
) -> Pipeline:
    """An LDMTextToImagePipeline folder: unet/, vqvae/ (KL), bert/, tokenizer/, scheduler/."""
    from transformers import BertTokenizer

    from model.ldmbert import (
        BertTextEncoder,
        LDMBert,
        ldmbert_config_from_diffusers,
        ldmbert_state_dict_from_diffusers,
    )
    from model.unet import UNetModel
    from model.unet_convert import unet_config_from_diffusers, unet_state_dict_from_diffusers
    from model.vae_convert import vae_from_diffusers

    unet_dir = folder / "unet"
    unet_json = read_json(unet_dir / "config.json")
    unet_cfg = unet_config_from_diffusers(unet_json, source=str(unet_dir))
    weights = WeightFile(find_weights(unet_dir, "diffusion_pytorch_model"))
    nhwc = prefers_channels_last(device)
    raw = weights.read(list(weights.shapes()), device=device, dtype=dtype, channels_last=nhwc)
    unet = build_module(
        lambda: UNetModel(unet_cfg),
        unet_state_dict_from_diffusers(raw, unet_cfg, source=str(weights.path)),
        what="UNet", source=str(weights.path), device=device, dtype=dtype,
    )  # fmt: skip
    del raw
    bert_dir = folder / "bert"
    bert_cfg = ldmbert_config_from_diffusers(
        read_json(bert_dir / "config.json"), source=str(bert_dir)
    )
    stem = "model" if any(bert_dir.glob("model*")) else "pytorch_model"  # transformers' names
    bert_file = WeightFile(find_weights(bert_dir, stem))
    bert_raw = bert_file.read(list(bert_file.shapes()), device=device, dtype=dtype)
    bert = build_module(
        lambda: LDMBert(bert_cfg), ldmbert_state_dict_from_diffusers(bert_raw),
        what="LDMBert", source=str(bert_file.path), device=device, dtype=dtype,
    )  # fmt: skip
    tokenizer = BertTokenizer.from_pretrained(str(folder / "tokenizer"))
    vae = vae_from_diffusers(folder / "vqvae", device=device, dtype=dtype)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    schedule = NoiseSchedule.from_config(
        read_json(sched_path) if sched_path.is_file() else LDM_SCHEDULER_CONFIG
    )
    log.info("loaded ldm-text2im folder %s on %s/%s", folder, device, dtype)
    side = unet_json.get("sample_size") or 32
    return Pipeline(
        unet=unet,
        vae=vae,
        text=BertTextEncoder(bert, tokenizer),  # type: ignore[arg-type]
        schedule=schedule,
        name=name or folder.name,
        native_size=int(side[0] if isinstance(side, list) else side) * vae.downsampling_factor,
        family="ldm-text2im",
    )


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
