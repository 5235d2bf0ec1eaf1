"""Live previews: a cheap picture of a job's current latents, without the VAE.

A latent pixel of the Stable Diffusion autoencoders maps to RGB almost linearly, so a 4×3
matrix per autoencoder gives a recognisable image at latent resolution for the cost of one
tiny matmul (no extra weights, no decoder call on the serving path). The coefficients are
AUTOMATIC1111's published "cheap approximation" figures. Latents of other autoencoders (other
channel counts) are shown by their first three channels, each stretched to the full range.

Mid-trajectory the latents are ``a·x0 + b·ε`` (`model.samplers.Trajectory.noise_ab`); they are
divided by ``√(a² + b²)`` so early previews show noise at the clean latents' scale rather than
a blown-out image (k-diffusion samplers start at σ ≈ 14).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Autoencoder (by model family prefix) -> rows = latent channels, columns = R, G, B.
_SD_VAE = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))  # fmt: skip
_SDXL_VAE = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163), (-0.3730, -0.2499, -0.2088))  # fmt: skip
LATENT_RGB: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sdxl": _SDXL_VAE,
    "sd1": _SD_VAE,
    "sd2": _SD_VAE,
    "demo": _SD_VAE,
}


def latent_rgb_factors(family: str, channels: int) -> Tensor | None:
    """The (C, 3) matrix for a family's latents, or None where no linear map is known."""
    for prefix, rows in LATENT_RGB.items():
        if family.startswith(prefix) and len(rows) == channels:
            return torch.tensor(rows, dtype=torch.float32)
    return None


def preview_pixels(latents: Tensor, family: str, a: float = 1.0, b: float = 0.0) -> np.ndarray:
    """(H, W, 3) uint8 at latent resolution from one image's (1 or no batch, C, h, w) latents
    that stand at ``a·x0 + b·ε`` on their trajectory."""
    x = latents.detach().float().reshape(-1, *latents.shape[-2:]).cpu()  # (C, h, w)
    x = x / max(math.hypot(a, b), 1e-6)
    factors = latent_rgb_factors(family, x.shape[0])
    if factors is not None:
        rgb = torch.einsum("chw,cr->hwr", x, factors)  # about [-1, 1]
        rgb = (rgb + 1) / 2
    else:
        picked = x[[min(i, x.shape[0] - 1) for i in range(3)]]  # grey for 1-channel latents
        lo = picked.amin(dim=(1, 2), keepdim=True)
        hi = picked.amax(dim=(1, 2), keepdim=True)
        rgb = ((picked - lo) / (hi - lo).clamp_min(1e-6)).permute(1, 2, 0)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
