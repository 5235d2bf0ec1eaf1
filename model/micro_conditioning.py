"""SDXL's micro-conditioning (Podell et al., 2023, §2.2-2.3): sizes, crop and the refiner's
aesthetic score as "time ids", embedded like timesteps beside the pooled text vector.

How many a model takes is read from its UNet: the added embedding's input width minus the
pooled vector's, over the sinusoid width per id — 6 for the base, 5 for the refiner.
"""

from __future__ import annotations

import torch

from model.unet_config import UNetConfig

DEFAULT_AESTHETIC_SCORES = (6.0, 2.5)  # the refiner's (aesthetic_score, negative_...): diffusers'


def time_id_count(cfg: UNetConfig, pooled_dim: int, name: str) -> int:
    """6 (original size, crop top-left, target size), 5 (the refiner: sizes, crop, aesthetic
    score) or 0 (no text_time embedding); ValueError where the widths do not add up."""
    if cfg.label != "text_time":
        return 0
    count, rest = divmod((cfg.adm_in_channels or 0) - pooled_dim, cfg.addition_time_embed_dim)
    if rest or count not in (5, 6) or not pooled_dim:
        raise ValueError(
            f"{name}: the UNet's added embedding takes {cfg.adm_in_channels} inputs, which a "
            f"{pooled_dim}-d pooled text vector and time ids of {cfg.addition_time_embed_dim} "
            "channels cannot fill"
        )
    return count


def time_ids(
    count: int, width: int, height: int, aesthetic: tuple[float, float] = DEFAULT_AESTHETIC_SCORES
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(conditional, unconditional) time ids (1, count) of an output image, as diffusers' SDXL
    pipelines build them by default: original size = target size = the output's (height,
    width), crop (0, 0); the refiner's last id is the (negative) aesthetic score."""
    if not count:
        return None
    sizes = [float(height), float(width), 0.0, 0.0]
    if count == 6:
        ids = torch.tensor([[*sizes, float(height), float(width)]])
        return ids, ids
    score, negative = aesthetic
    return torch.tensor([[*sizes, score]]), torch.tensor([[*sizes, negative]])
