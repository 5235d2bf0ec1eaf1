"""The LDM pipeline: encode prompts, batched denoising steps, decode — and generate() for library use.

The engine drives the pieces (`encode_prompts`, `unet_forward`, `decode_latents`) itself to
batch many jobs; `generate()` is the one-job loop over the same pieces, so a job served by
the engine and a `generate()` call with the same parameters give the same image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from model import samplers
from model.text import TextEncoder
from model.unet import UNetModel, prefers_channels_last
from model.vae import AutoencoderKL

log = logging.getLogger(__name__)


class GenerationError(ValueError):
    """A generation request the pipeline cannot run; the message says which parameter and why."""


@dataclass
class Pipeline:
    """A loaded model: UNet, VAE, text encoder and noise schedule on one device and dtype."""

    unet: UNetModel
    vae: AutoencoderKL
    text: TextEncoder
    schedule: samplers.NoiseSchedule
    name: str = "model"
    decode_chunk: int = 4  # images decoded per VAE call: bounds activation memory at 512x512+

    def __post_init__(self) -> None:
        if prefers_channels_last(self.device):  # loaders read conv weights NHWC already
            self.unet.use_channels_last()

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsampling_factor

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(1, C, H/f, W/f) of one image, after checking the size divides by f."""
        f = self.vae_scale_factor
        for field, value in (("width", width), ("height", height)):
            if value <= 0 or value % f:
                raise GenerationError(f"{field} must be a positive multiple of {f}, got {value}")
        return (1, self.latent_channels, height // f, width // f)

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (N, 77, D) in the UNet's dtype."""
        return self.text.encode(list(prompts)).to(self.device, self.dtype)

    @torch.inference_mode()
    def unet_forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One UNet call; float32 latents in, float32 model output out."""
        return self.unet(x.to(self.device), t.to(self.device), context).float()

    @torch.inference_mode()
    def guided_output(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        guidance: torch.Tensor | None,
    ) -> torch.Tensor:
        """UNet output with classifier-free guidance as one batched call (uncond rows first)."""
        if uncond is None or guidance is None:
            return self.unet_forward(x, t, cond)
        out = self.unet_forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
        out_uncond, out_cond = out.chunk(2)
        g = guidance.to(out.device, out.dtype)[:, None, None, None]
        return out_uncond + g * (out_cond - out_uncond)

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents (B, C, h, w) -> uint8 images (B, H, W, 3), as diffusers converts them."""
        chunks = []
        for part in latents.split(self.decode_chunk):
            z = part.to(self.device, self.vae_dtype) / self.vae.scaling_factor
            images = self.vae.decode(z).float()  # (b, 3, H, W) in [-1, 1]
            images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            chunks.append((images * 255).round().astype(np.uint8))
        return np.concatenate(chunks)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        width: int = 512,
        height: int = 512,
        steps: int = 30,
        guidance_scale: float = 7.5,
        sampler: str = "euler_a",
        seed: int = 0,
        num_images: int = 1,
    ) -> list[Image.Image]:
        """Text-to-image for one prompt; image i uses the generator seeded with seed + i."""
        shape = self.latent_shape(width, height)
        if steps < 1:
            raise GenerationError(f"steps must be at least 1, got {steps}")
        if num_images < 1:
            raise GenerationError(f"num_images must be at least 1, got {num_images}")
        if self.unet.config.in_channels != self.latent_channels:
            raise GenerationError(
                f"{self.name}: a {self.unet.config.in_channels}-channel (inpainting) UNet needs an "
                "image and a mask; text-to-image is not supported for it"
            )
        try:
            traj = samplers.plan(sampler, steps, self.schedule)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
        states = [
            samplers.start(traj, torch.Generator("cpu").manual_seed(seed + i), shape, self.device)
            for i in range(num_images)
        ]
        trajs = [traj] * num_images
        guided = guidance_scale > 1.0  # as diffusers: no unconditional pass at or below 1
        cond = self.encode_prompts([prompt]).expand(num_images, -1, -1)
        uncond = (
            self.encode_prompts([negative_prompt]).expand(num_images, -1, -1) if guided else None
        )
        guidance = torch.full((num_images,), float(guidance_scale)) if guided else None
        while states[0].k < traj.n_evals:
            x_in, t = samplers.model_input(trajs, states)
            out = self.guided_output(x_in, t, cond, uncond, guidance)
            states = samplers.advance(trajs, states, out)
        pixels = self.decode_latents(torch.cat([s.x for s in states]))
        return [Image.fromarray(p) for p in pixels]
