"""What the two UNet config readers share: one canonical :class:`UNetConfig` form (an int
where all levels agree; the up path's own fields only where it differs), so that configs
read from a single file (:mod:`model.unet_config_ldm`) and from a diffusers folder
(:mod:`model.unet_config_diffusers`) compare equal.
"""

from __future__ import annotations

from typing import Any

from model.unet_config import UNetConfig
from model.weights import CheckpointError


def uniform(values: list[int], what: str, source: str) -> int:
    if len(set(values)) != 1:
        raise CheckpointError(f"{source}: UNet {what} differ within a level ({values})")
    return values[0]


def _compact(values: list[int] | tuple[int, ...] | int | None) -> int | tuple[int, ...] | None:
    """One int where every level has the same value, else the per-level tuple."""
    if values is None or isinstance(values, int):
        return values
    return values[0] if len(set(values)) == 1 else tuple(values)


def canonical_config(
    *,
    attention: list[bool],
    attention_up: list[bool],
    depth: list[int],
    depth_up: list[int],
    depth_middle: int,
    num_res_blocks: list[int],
    num_heads: list[int] | int | None,
    **rest: Any,
) -> UNetConfig:
    """A UNetConfig in one canonical form (an int where all levels agree; the up path's own
    fields only where it differs), so that configs read from either layout compare equal."""
    up_levels = tuple(i for i, a in enumerate(attention_up) if a)
    down_levels = tuple(i for i, a in enumerate(attention) if a)
    # Depths of levels without attention mean nothing; keep them at 1 so they compare equal.
    depth = [d if a else 1 for d, a in zip(depth, attention, strict=True)]
    depth_up = [d if a else 1 for d, a in zip(depth_up, attention_up, strict=True)]
    return UNetConfig(
        attention_levels=down_levels,
        attention_levels_up=None if up_levels == down_levels else up_levels,
        transformer_depth=_compact(depth),  # type: ignore[arg-type]
        transformer_depth_up=None if depth_up == depth else _compact(depth_up),
        transformer_depth_middle=None if depth_middle == depth[-1] else depth_middle,
        num_res_blocks=_compact(num_res_blocks),  # type: ignore[arg-type]
        num_heads=_compact(num_heads),
        **rest,
    )
