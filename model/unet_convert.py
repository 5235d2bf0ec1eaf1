"""UNet architecture detection and key mapping: original single-file layout ⇄ diffusers folders.

Our module names *are* the original layout, so single files need only architecture detection;
diffusers folders need their config read and their key names mapped to ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from model.unet_config import UNetConfig
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


def _uniform(values: list[int], what: str, source: str) -> int:
    if len(set(values)) != 1:
        raise CheckpointError(f"{source}: UNet {what} differ within a level ({values})")
    return values[0]


def _compact(values: list[int] | tuple[int, ...] | int | None) -> int | tuple[int, ...] | None:
    """One int where every level has the same value, else the per-level tuple."""
    if values is None or isinstance(values, int):
        return values
    return values[0] if len(set(values)) == 1 else tuple(values)


def _per_level_config(
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
    depth = [_uniform(d, "transformer depths", source) for d in level_depths]

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
        depth_up[level] = _uniform(found, "transformer depths", source)
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
    return _per_level_config(
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
    per_block = [_uniform([int(d) for d in b], "transformer depths", source) for b in reverse]
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
    return _per_level_config(
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


def _diffusers_prefix_map(cfg: UNetConfig) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix -> (our prefix, is a resnet)."""
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
    if cfg.label == "classes":
        m["class_embedding"] = ("label_emb", False)
    elif cfg.label is not None:
        module = "add_embedding" if cfg.label == "text_time" else "class_embedding"
        m[f"{module}.linear_1"] = ("label_emb.0.0", False)
        m[f"{module}.linear_2"] = ("label_emb.0.2", False)
    for n, (level, j) in enumerate(cfg.input_layout(), start=1):
        if j is None:
            m[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", False)
        else:
            m[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{n}.0", True)
            m[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{n}.1", False)
    for n, (level, j) in enumerate(cfg.output_layout()):
        block = cfg.levels - 1 - level  # diffusers numbers up blocks from the bottom
        m[f"up_blocks.{block}.resnets.{j}"] = (f"output_blocks.{n}.0", True)
        m[f"up_blocks.{block}.attentions.{j}"] = (f"output_blocks.{n}.1", False)
        if level and j == cfg.res_blocks(level):
            slot = 2 if cfg.has_attention(level, up=True) else 1
            m[f"up_blocks.{block}.upsamplers.0.conv"] = (f"output_blocks.{n}.{slot}.conv", False)
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
