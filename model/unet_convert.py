"""UNet key mapping: diffusers folders' weight names → ours (the original single-file layout),
ours → a single file, and ours → diffusers' module names (for adapter files).

Our module names *are* the original layout, so single files need only architecture detection
(:mod:`model.unet_config_ldm`); diffusers folders need their config read
(:mod:`model.unet_config_diffusers`) and their key names mapped to ours, here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model.unet_config import UNetConfig
from model.unet_config_diffusers import unet_config_from_diffusers
from model.unet_config_ldm import unet_config_from_ldm
from model.weights import CheckpointError

# The config readers are re-exported for the loaders that import them from here
# (model/checkpoint.py, model/ldm.py).
__all__ = [
    "LDM_PREFIX",
    "diffusers_module_names",
    "unet_config_from_diffusers",
    "unet_config_from_ldm",
    "unet_state_dict_from_diffusers",
    "unet_state_dict_to_ldm",
]

LDM_PREFIX = "model.diffusion_model."

_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


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
