"""One job's rows, ready to denoise: its images' trajectories, start states and conditioning,
drawn by the noise convention (image i draws from Generator("cpu").manual_seed(seed + i), in
the order the diffusers pipeline of the mode draws: source posterior or the x4 upscaler's
low-res noise, noise, masked-image posterior), with the inputs each mode needs (img2img's
noised source latents, inpainting's mask and masked image — concatenated or blended —, an
upscaler's low-res image, SDXL's time ids, the x4's noise-level labels, LoRA sets).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model import samplers
from model.conditioning import Conditioning
from model.denoise import Blend, Row
from model.generation_checks import DEFAULT_STRENGTH
from model.lora_layers import AdapterSet
from model.micro_conditioning import DEFAULT_AESTHETIC_SCORES, time_ids

if TYPE_CHECKING:
    from model.pipeline import Pipeline


@dataclass(frozen=True)
class JobStart:
    """A job ready to denoise: one row per image, and what `finish` needs afterwards."""

    rows: list[Row]
    source: np.ndarray | None = None  # (H, W, 3) uint8: kept pixels when keep_unmasked
    keep: np.ndarray | None = None  # (H, W, 1) bool: pixels to keep from `source`


def pil_rgb(
    image: Image.Image, width: int, height: int, resample: int = Image.LANCZOS
) -> Image.Image:
    """The image at the output size, resized as diffusers' pipelines do (Lanczos; the x4
    upscaler's VaeImageProcessor: bicubic)."""
    image = image.convert("RGB")
    return image if image.size == (width, height) else image.resize((width, height), resample)


@torch.inference_mode()
def begin_job(
    pipe: Pipeline,
    cond: Conditioning,
    uncond: Conditioning | None,
    *,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    sampler: str,
    seed: int,
    num_images: int,
    image: Image.Image | None = None,
    mask: Image.Image | None = None,
    strength: float | None = None,
    keep_unmasked: bool = False,
    adapters: AdapterSet = (),
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    noise_level: int | None = None,
) -> JobStart:
    """Rows for one job's images (one row of text conditioning given: `encode_prompts`,
    `unconditional`), following the noise
    convention: image i draws from Generator("cpu").manual_seed(seed + i), in the order the
    diffusers pipeline of the mode draws (source posterior or the x4 upscaler's low-res
    noise, noise, masked-image posterior)."""
    mode, strength = pipe.check(
        width=width, height=height, steps=steps, sampler=sampler, num_images=num_images,
        image=image, mask=mask, strength=strength,
    )  # fmt: skip
    shape = pipe.latent_shape(width, height)
    start = samplers.start_step(steps, strength) if mode in DEFAULT_STRENGTH else 0
    traj = samplers.plan(sampler, steps, pipe.schedule, start)
    sf = pipe.vae.scaling_factor
    size = (width, height) if mode != "upscale" else shape[:1:-1]  # the low-res input's
    x4 = pipe.low_res_noise if mode == "upscale" else None
    resample = Image.BICUBIC if x4 is not None else Image.LANCZOS
    source = pil_rgb(image, *size, resample) if image is not None else None
    pixels = None
    if source is not None:
        arr = np.asarray(source, dtype=np.float32) / 255.0  # (H, W, 3)
        pixels = torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W)
    pure_noise = mode not in DEFAULT_STRENGTH or (mode == "inpaint" and strength == 1.0)
    blend = mode == "inpaint" and not pipe.concat_inpainting
    posterior = (
        pipe.encode_image(pixels) if pixels is not None and (not pure_noise or blend) else None
    )
    mask_px = masked = mask_lat = None
    if mode == "inpaint":
        gray = mask.convert("L")  # type: ignore[union-attr]
        if gray.size != (width, height):
            gray = gray.resize((width, height), Image.LANCZOS)
        mask_px = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None]
        mask_px = (mask_px >= 0.5).float()  # binarised as diffusers' mask processor does
        masked = pipe.encode_image(pixels * (mask_px < 0.5))  # type: ignore[operator]
        mask_lat = F.interpolate(mask_px, size=shape[2:]).to(pipe.device)  # nearest
    guided = guidance_scale > 1.0 and pipe.takes_prompt  # as diffusers: no CFG at or below 1
    lowres = pixels.to(pipe.device) if mode == "upscale" else None  # type: ignore[union-attr]
    level = x4.level(noise_level) if x4 is not None else 0
    labels = x4.labels(level).to(pipe.device) if x4 is not None else None
    score, negative = DEFAULT_AESTHETIC_SCORES
    scores = (
        score if aesthetic_score is None else aesthetic_score,
        negative if negative_aesthetic_score is None else negative_aesthetic_score,
    )
    ids = time_ids(pipe.time_id_count, width, height, scores)
    text = replace(cond, time_ids=None if ids is None else ids[0].to(pipe.device))
    rows = []
    for i in range(num_images):
        gen = torch.Generator("cpu").manual_seed(seed + i)
        clean = posterior.sample(gen) * sf if posterior is not None else None
        concat = lowres  # (1, 3, h, w) for an upscaler, else None
        if x4 is not None:  # drawn before the latents' noise, as diffusers does
            concat = x4.noised(pixels, level, gen).to(pipe.device)  # type: ignore[arg-type]
        noise = torch.randn(shape, generator=gen, dtype=torch.float32).to(pipe.device)
        if pure_noise:
            state = samplers.from_noise(traj, noise, gen)
        else:
            state = samplers.start_noised(traj, clean, noise, gen)  # type: ignore[arg-type]
        if masked is not None:
            masked_lat = masked.sample(gen) * sf
            if pipe.concat_inpainting:
                concat = torch.cat([mask_lat, masked_lat], dim=1)  # type: ignore[list-item]
        c = replace(
            text, concat=concat, scale_concat=mode == "upscale" and x4 is None,
            class_labels=labels, loras=(adapters,) if adapters else None,
        )  # fmt: skip
        u = None
        if guided and uncond is not None:
            u_ids = None if ids is None else ids[1].to(pipe.device)
            u = c.with_text(uncond.crossattn, uncond.pooled, u_ids)
        b = Blend(mask_lat, clean, noise) if blend else None  # type: ignore[arg-type]
        rows.append(Row(traj, state, c, u, float(guidance_scale), b))
    if keep_unmasked and mask_px is not None and source is not None:
        keep = (mask_px[0, 0] < 0.5).numpy()[:, :, None]
        return JobStart(rows, np.asarray(source, dtype=np.uint8), keep)
    return JobStart(rows)
