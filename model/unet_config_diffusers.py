"""A diffusers UNet2DConditionModel ``config.json`` → :class:`UNetConfig`.

Every value of a key this UNet does not implement fails naming the key, rather than loading
a model that computes something else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model.unet_config import UNetConfig
from model.unet_config_canonical import canonical_config, uniform
from model.weights import CheckpointError

_FIXED = {  # diffusers config keys whose other values this UNet does not implement
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "norm_eps": (1e-5,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "class_embed_type": (None, "timestep", "projection"),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None, "text_time"),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}


def _require(cfg: Mapping[str, Any], source: str) -> None:
    for key, allowed in _FIXED.items():
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{source}: UNet config {key}={cfg[key]!r} is not supported")


def _levels(cfg: Mapping[str, Any], key: str, default: Any, n: int, source: str) -> list[Any]:
    """A per-level diffusers field: one value for every level, or a list of n."""
    value = cfg.get(key)
    value = default if value is None else value
    if not isinstance(value, list | tuple):
        return [value] * n
    if len(value) != n:
        raise CheckpointError(
            f"{source}: UNet config {key} has {len(value)} entries for {n} levels"
        )
    return list(value)


def _up_depths(cfg: Mapping[str, Any], down: list[int], n: int, source: str) -> list[int]:
    """Transformer depths of the up path per level (diffusers lists them per up block)."""
    reverse = cfg.get("reverse_transformer_layers_per_block")
    if reverse is None:
        return down
    per_block = [uniform([int(d) for d in b], "transformer depths", source) for b in reverse]
    if len(per_block) != n:
        raise CheckpointError(
            f"{source}: UNet config reverse_transformer_layers_per_block has {len(per_block)} "
            f"entries for {n} levels"
        )
    return per_block[::-1]


def _label_from_diffusers(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The label embedding: class table, class MLP or SDXL's added text_time embedding."""
    kind, classes = cfg.get("class_embed_type"), cfg.get("num_class_embeds")
    added = cfg.get("addition_embed_type")
    adm = cfg.get("projection_class_embeddings_input_dim")
    if added and (kind or classes):
        raise CheckpointError(
            f"{source}: UNet config addition_embed_type={added!r} with a class embedding "
            "(class_embed_type / num_class_embeds) is not supported"
        )
    needs = ["projection_class_embeddings_input_dim"] if added or kind == "projection" else []
    if added:
        needs.append("addition_time_embed_dim")
    for key in needs:
        if cfg.get(key) is None:
            what = f"addition_embed_type={added!r}" if added else f"class_embed_type={kind!r}"
            raise CheckpointError(f"{source}: UNet config {what} needs {key}")
    if added == "text_time":
        return {
            "label": "text_time",
            "adm_in_channels": int(adm),
            "addition_time_embed_dim": int(cfg["addition_time_embed_dim"]),
        }
    if kind == "projection":
        return {"label": "projection", "adm_in_channels": int(adm)}
    if kind == "timestep":
        return {"label": "timestep"}
    if classes:
        return {"label": "classes", "num_classes": int(classes)}
    return {}


def unet_config_from_diffusers(cfg: Mapping[str, Any], *, source: str) -> UNetConfig:
    """Translate a diffusers UNet2DConditionModel config.json into a UNetConfig.

    Heads follow diffusers exactly: `num_attention_heads`, else the legacy
    `attention_head_dim`, is the number of heads per level (the middle block takes the last
    level's), each head `channels // heads` wide.
    """
    _require(cfg, source)
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    up_kinds = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    if not down or any(d not in kinds for d in down):
        raise CheckpointError(f"{source}: UNet down_block_types {down} are not supported")
    if len(up) != len(down) or any(u not in up_kinds for u in up):
        raise CheckpointError(f"{source}: UNet up_block_types {up} are not supported")
    boc = [int(c) for c in cfg["block_out_channels"]]
    n, mc = len(boc), boc[0]
    if len(down) != n:
        raise CheckpointError(f"{source}: {len(down)} down_block_types for {n} block_out_channels")
    if any(c % mc for c in boc):
        raise CheckpointError(f"{source}: block_out_channels {boc} are not multiples of {mc}")
    if cfg.get("norm_num_groups", 32) is None:
        raise CheckpointError(f"{source}: UNet config norm_num_groups=None is not supported")
    context = {int(c) for c in _levels(cfg, "cross_attention_dim", 1280, n, source)}
    if len(context) != 1:
        raise CheckpointError(
            f"{source}: UNet config cross_attention_dim per level {sorted(context)} is not supported"
        )
    cross_only = [bool(c) for c in _levels(cfg, "only_cross_attention", False, n, source)]
    middle_only = cfg.get("mid_block_only_cross_attention")
    if middle_only is None:  # diffusers: the one flag for all, else False
        middle_only = cfg.get("only_cross_attention", False) is True
    heads_key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
    heads = [int(h) for h in _levels(cfg, heads_key, 8, n, source)]
    depth = [int(d) for d in _levels(cfg, "transformer_layers_per_block", 1, n, source)]
    return canonical_config(
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in boc),
        num_res_blocks=[int(v) for v in _levels(cfg, "layers_per_block", 2, n, source)],
        attention=[kinds[d] for d in down],
        attention_up=[up_kinds[u] for u in reversed(up)],
        depth=depth,
        depth_up=_up_depths(cfg, depth, n, source),
        depth_middle=depth[-1],
        num_heads=heads,
        head_dim=None,
        context_dim=context.pop(),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        cross_only_levels=tuple(
            i for i, c in enumerate(cross_only) if c and (kinds[down[i]] or up_kinds[up[n - 1 - i]])
        ),
        cross_only_middle=bool(middle_only),
        **_label_from_diffusers(cfg, source),
    )
