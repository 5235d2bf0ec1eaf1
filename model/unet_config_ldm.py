"""UNet architecture detection from an original single file's tensor shapes.

Our module names *are* the original layout, so a single file needs no key mapping, only its
architecture; what shapes cannot tell follows the SD conventions (see
:func:`unet_config_from_ldm`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from model.unet_config import UNetConfig
from model.unet_config_canonical import canonical_config, uniform
from model.weights import CheckpointError


def _block_indices(sd: Mapping[str, torch.Tensor], root: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(root)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _transformer_depth(sd: Mapping[str, torch.Tensor], block: str) -> int:
    """Transformer blocks of the spatial transformer at `block` (0: none there)."""
    if f"{block}.proj_in.weight" not in sd:
        return 0
    return len(_block_indices(sd, f"{block}.transformer_blocks"))


def _cross_only(sd: Mapping[str, torch.Tensor], block: str, context_dim: int) -> bool:
    """Whether the transformer at `block` attends to the text in its first attention (its
    keys read the context's width, not its own); where both widths agree, shapes cannot
    tell, and it is taken for self-attention."""
    key = f"{block}.transformer_blocks.0.attn1.to_k.weight"
    if key not in sd:
        return False
    k = sd[key]
    return int(k.shape[1]) == context_dim != int(k.shape[0])


def unet_config_from_ldm(
    sd: Mapping[str, torch.Tensor],
    *,
    source: str,
    label: str | None = None,
    addition_time_embed_dim: int = 256,
) -> UNetConfig:
    """Detect the UNet architecture from tensor shapes (keys without `model.diffusion_model.`).

    What shapes cannot tell follows the SD conventions: SD 1.x (768-d context, conv
    projections) uses 8 heads; SD 2.x (1024-d context or linear projections) 64 channels
    per head and float32 attention under fp16; SDXL (a "text_time" label embedding) 64 per
    head. An MLP `label_emb.0.*` is SDXL's added embedding for a 2048-d (base) or 1280-d
    (refiner) context, else a class projection, unless `label` says which it is.
    """
    try:
        conv_in = sd["input_blocks.0.0.weight"]
        mc, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        out_channels = int(sd["out.2.weight"].shape[0])
        context_dim = int(sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
        linear = sd["middle_block.1.proj_in.weight"].ndim == 2
    except KeyError as exc:
        raise CheckpointError(f"{source}: not a Stable Diffusion UNet (no {exc.args[0]})") from None

    channel_mult: list[int] = []
    res: list[int] = []
    level_depths: list[list[int]] = [[]]
    cross_only: set[int] = set()
    for i in _block_indices(sd, "input_blocks")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:  # a downsample closes a level
            level_depths.append([])
            continue
        if not level_depths[-1]:
            channel_mult.append(int(sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]) // mc)
        level_depths[-1].append(_transformer_depth(sd, f"input_blocks.{i}.1"))
        if _cross_only(sd, f"input_blocks.{i}.1", context_dim):
            cross_only.add(len(level_depths) - 1)
    res = [len(d) for d in level_depths]
    if not channel_mult or len(channel_mult) != len(res) or 0 in res:
        raise CheckpointError(f"{source}: unknown UNet architecture (res blocks per level {res})")
    depth = [uniform(d, "transformer depths", source) for d in level_depths]

    outputs = _block_indices(sd, "output_blocks")
    if len(outputs) != sum(r + 1 for r in res):
        raise CheckpointError(
            f"{source}: unknown UNet architecture ({len(outputs)} output blocks for "
            f"res blocks per level {res})"
        )
    depth_up = [0] * len(res)
    n = 0
    for level in reversed(range(len(res))):
        found = [_transformer_depth(sd, f"output_blocks.{n + j}.1") for j in range(res[level] + 1)]
        depth_up[level] = uniform(found, "transformer depths", source)
        if _cross_only(sd, f"output_blocks.{n}.1", context_dim):
            cross_only.add(level)
        n += res[level] + 1

    num_classes = adm_in = None
    if "label_emb.weight" in sd:
        label, num_classes = "classes", int(sd["label_emb.weight"].shape[0])
    elif "label_emb.0.0.weight" in sd:
        adm_in = int(sd["label_emb.0.0.weight"].shape[1])
        label = label or ("text_time" if context_dim in (2048, 1280) else "projection")
        if label == "timestep" and adm_in != mc:
            raise CheckpointError(f"{source}: label_emb takes {adm_in} inputs, not {mc}")
        if label == "timestep":
            adm_in = None
    else:
        label = None
    sdxl = label == "text_time"
    sd2 = not sdxl and (linear or context_dim == 1024)
    return canonical_config(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=mc,
        channel_mult=tuple(channel_mult),
        num_res_blocks=res,
        attention=[d > 0 for d in depth],
        attention_up=[d > 0 for d in depth_up],
        depth=depth,
        depth_up=depth_up,
        depth_middle=len(_block_indices(sd, "middle_block.1.transformer_blocks")),
        num_heads=None if sd2 or sdxl else 8,
        head_dim=64 if sd2 or sdxl else None,
        context_dim=context_dim,
        use_linear_projection=linear,
        upcast_attention=sd2,
        cross_only_levels=tuple(sorted(cross_only)),
        cross_only_middle=_cross_only(sd, "middle_block.1", context_dim),
        label=label,
        num_classes=num_classes,
        adm_in_channels=adm_in,
        addition_time_embed_dim=addition_time_embed_dim,
    )
