"""UNet architecture detection and key mapping: original single-file layout ⇄ diffusers folders.

Our module names *are* the original layout, so single files need only architecture detection;
diffusers folders need their config read and their key names mapped to ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from model.unet import UNetConfig
from model.weights import CheckpointError

LDM_PREFIX = "model.diffusion_model."

_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _block_indices(sd: Mapping[str, torch.Tensor], root: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(root)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def unet_config_from_ldm(sd: Mapping[str, torch.Tensor], *, source: str) -> UNetConfig:
    """Detect the UNet architecture from tensor shapes (keys without `model.diffusion_model.`).

    What shapes cannot tell follows the SD conventions: SD 1.x (768-d context, conv
    projections) uses 8 heads; SD 2.x (1024-d context or linear projections) 64 channels
    per head and float32 attention under fp16.
    """
    try:
        conv_in = sd["input_blocks.0.0.weight"]
        mc, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        out_channels = int(sd["out.2.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"{source}: not a Stable Diffusion UNet (no {exc.args[0]})") from None

    channel_mult: list[int] = []
    attention_levels: list[int] = []
    res_per_level: list[int] = []
    count = 0
    for i in _block_indices(sd, "input_blocks")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:  # a downsample closes a level
            res_per_level.append(count)
            count = 0
            continue
        if count == 0:
            channel_mult.append(int(sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]) // mc)
            if f"input_blocks.{i}.1.proj_in.weight" in sd:
                attention_levels.append(len(channel_mult) - 1)
        count += 1
    res_per_level.append(count)
    if len(set(res_per_level)) != 1 or not channel_mult:
        raise CheckpointError(
            f"{source}: unknown UNet architecture (res blocks per level {res_per_level})"
        )

    proj_in = sd["middle_block.1.proj_in.weight"]
    depth = len(_block_indices(sd, "middle_block.1.transformer_blocks"))
    context_dim = int(sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    linear = proj_in.ndim == 2
    sd2 = linear or context_dim == 1024
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=mc,
        channel_mult=tuple(channel_mult),
        num_res_blocks=res_per_level[0],
        attention_levels=tuple(attention_levels),
        num_heads=None if sd2 else 8,
        head_dim=64 if sd2 else None,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_projection=linear,
        upcast_attention=sd2,
    )


def _require(cfg: Mapping[str, Any], key: str, allowed: tuple[Any, ...], source: str) -> None:
    if key in cfg and cfg[key] not in allowed:
        raise CheckpointError(f"{source}: UNet config {key}={cfg[key]!r} is not supported")


def unet_config_from_diffusers(cfg: Mapping[str, Any], *, source: str) -> UNetConfig:
    """Translate a diffusers UNet2DConditionModel config.json into a UNetConfig."""
    for key, allowed in {
        "class_embed_type": (None,),
        "addition_embed_type": (None,),
        "encoder_hid_dim": (None,),
        "time_embedding_type": ("positional",),
        "flip_sin_to_cos": (True,),
        "freq_shift": (0,),
        "act_fn": ("silu",),
        "center_input_sample": (False,),
        "dual_cross_attention": (False,),
        "only_cross_attention": (False,),
        "resnet_time_scale_shift": ("default",),
        "conv_in_kernel": (3,),
        "conv_out_kernel": (3,),
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "num_class_embeds": (None,),
    }.items():
        _require(cfg, key, allowed, source)
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if not down or any(d not in kinds for d in down):
        raise CheckpointError(f"{source}: UNet down_block_types {down} are not supported")
    mirrored = [d.replace("Down", "Up") for d in reversed(down)]
    if up != mirrored:
        raise CheckpointError(f"{source}: UNet up_block_types {up} do not mirror {down}")
    boc = [int(c) for c in cfg["block_out_channels"]]
    mc = boc[0]
    if any(c % mc for c in boc):
        raise CheckpointError(f"{source}: block_out_channels {boc} are not multiples of {mc}")
    layers = cfg.get("layers_per_block", 2)
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(layers, list | tuple) or isinstance(depth, list | tuple):
        if isinstance(layers, list | tuple) and len(set(layers)) != 1:
            raise CheckpointError(f"{source}: per-level layers_per_block {layers} is not supported")
        if isinstance(depth, list | tuple) and len(set(depth)) != 1:
            raise CheckpointError(f"{source}: per-level transformer depth {depth} is not supported")
        layers = layers[0] if isinstance(layers, list | tuple) else layers
        depth = depth[0] if isinstance(depth, list | tuple) else depth
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    num_heads: int | None
    head_dim: int | None
    if isinstance(heads, int):
        num_heads, head_dim = heads, None
    else:
        heads = [int(h) for h in heads]
        if len(set(heads)) == 1:
            num_heads, head_dim = heads[0], None
        elif len({c // h for c, h in zip(boc, heads, strict=True)}) == 1:
            num_heads, head_dim = None, boc[0] // heads[0]
        else:
            raise CheckpointError(f"{source}: UNet heads per level {heads} are not supported")
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in boc),
        num_res_blocks=int(layers),
        attention_levels=tuple(i for i, d in enumerate(down) if kinds[d]),
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=int(depth),
        context_dim=int(cfg.get("cross_attention_dim", 768)),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
    )


def _diffusers_prefix_map(cfg: UNetConfig) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix -> (our prefix, is a resnet)."""
    nrb, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    m: dict[str, tuple[str, bool]] = {
        "conv_in": ("input_blocks.0.0", False),
        "time_embedding.linear_1": ("time_embed.0", False),
        "time_embedding.linear_2": ("time_embed.2", False),
        "conv_norm_out": ("out.0", False),
        "conv_out": ("out.2", False),
        "mid_block.resnets.0": ("middle_block.0", True),
        "mid_block.attentions.0": ("middle_block.1", False),
        "mid_block.resnets.1": ("middle_block.2", True),
    }
    for i in range(levels):
        for j in range(nrb):
            n = 1 + i * (nrb + 1) + j
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", True)
            m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{n}.1", False)
        m[f"down_blocks.{i}.downsamplers.0.conv"] = (
            f"input_blocks.{(i + 1) * (nrb + 1)}.0.op",
            False,
        )
    for i in range(levels):
        level = levels - 1 - i
        for j in range(nrb + 1):
            n = i * (nrb + 1) + j
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{n}.0", True)
            m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{n}.1", False)
        slot = 2 if level in cfg.attention_levels else 1
        m[f"up_blocks.{i}.upsamplers.0.conv"] = (
            f"output_blocks.{i * (nrb + 1) + nrb}.{slot}.conv",
            False,
        )
    return m


def unet_state_dict_from_diffusers(
    sd: Mapping[str, torch.Tensor], cfg: UNetConfig, *, source: str
) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to the original layout."""
    prefixes = _diffusers_prefix_map(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in prefixes:
                ours, resnet = prefixes[head]
                rest = parts[cut:]
                if resnet:
                    rest = [*_RESNET_RENAMES.get(rest[0], rest[0]).split("."), *rest[1:]]
                out[".".join([ours, *rest])] = value
                break
        else:
            raise CheckpointError(f"{source}: unexpected UNet weight '{key}'")
    return out


def unet_state_dict_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the single-file prefix (for writing checkpoints), in the default
    layout whatever the module's (safetensors stores only contiguous tensors)."""
    return {LDM_PREFIX + k: v.contiguous() for k, v in unet.state_dict().items()}


def diffusers_module_names(cfg: UNetConfig, names: list[str]) -> dict[str, str]:
    """Our module names -> diffusers' (the inverse of unet_state_dict_from_diffusers' renames),
    for adapter files that address modules by their diffusers names."""
    ours_to_theirs = {
        ours: (theirs, resnet) for theirs, (ours, resnet) in _diffusers_prefix_map(cfg).items()
    }
    resnet_back = {ours: theirs for theirs, ours in _RESNET_RENAMES.items()}
    out: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head not in ours_to_theirs:
                continue
            theirs, resnet = ours_to_theirs[head]
            rest = ".".join(parts[cut:])
            if resnet:
                rest = next(
                    (
                        t + rest[len(o) :]
                        for o, t in resnet_back.items()
                        if rest == o or rest.startswith(o + ".")
                    ),
                    rest,
                )
            out[name] = f"{theirs}.{rest}" if rest else theirs
            break
    return out
