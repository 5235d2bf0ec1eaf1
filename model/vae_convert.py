"""Checkpoint layouts <-> our VAE: original single file (native) and diffusers AutoencoderKL.

The original layout needs no renaming (module names mirror it); only the architecture has to
be read off the tensor shapes. diffusers renames the modules (`down_blocks.i.resnets.j`,
`mid_block.attentions.0.to_q`, ...), numbers the decoder's up blocks in order of use (the
original numbers them by resolution level, so up_blocks.0 is up.{L-1}) and stores the
mid-block attention projections as linear layers where the original has 1x1 convs; this file
maps all of that back, so both formats end up in the same module through the same strict,
meta-device `build_module`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from model.vae import AutoencoderKL, VAEConfig
from model.weights import CheckpointError, build_module

log = logging.getLogger(__name__)

LDM_VAE_PREFIX = "first_stage_model."
"""Prefix of the VAE keys inside an original single-file SD checkpoint."""


def _shape(sd: Mapping[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        hint = ""
        if any(k.startswith(LDM_VAE_PREFIX) for k in sd):
            hint = f" (strip the '{LDM_VAE_PREFIX}' prefix before calling)"
        raise CheckpointError(f"{source}: VAE weights are missing key '{key}'{hint}")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n


def vae_config_from_ldm(
    state_dict: Mapping[str, Tensor],
    scaling_factor: float = 0.18215,
    *,
    norm_groups: int | None = None,
    source: str = "checkpoint",
    double_z: bool = True,
) -> VAEConfig:
    """Detect the architecture from tensor shapes of the original-layout VAE weights.

    `state_dict` holds the VAE keys with the `first_stage_model.` prefix stripped
    (`encoder.conv_in.weight`, ...), which is also the layout of standalone `.ckpt` VAEs.
    The group-norm count is not stored in a checkpoint: unless given, it is 32 (every SD VAE)
    reduced to gcd(32, all widths) so narrow test/demo models still load. `double_z=False`
    reads a VQ autoencoder's encoder/decoder (model/vq_convert.py).
    """
    ch, in_channels = _shape(state_dict, "encoder.conv_in.weight", source)[:2]
    levels = _count(state_dict, "encoder.down.{}.block.0.conv1.weight")
    n_res = _count(state_dict, "encoder.down.0.block.{}.conv1.weight")
    if levels == 0 or n_res == 0:
        _shape(state_dict, "encoder.down.0.block.0.conv1.weight", source)
    widths = [
        _shape(state_dict, f"encoder.down.{i}.block.0.conv1.weight", source)[0]
        for i in range(levels)
    ]
    if any(w % ch for w in widths):
        raise CheckpointError(f"{source}: VAE level widths {widths} are not multiples of ch={ch}")
    z_channels = _shape(state_dict, "decoder.conv_in.weight", source)[1]
    enc_out = _shape(state_dict, "encoder.conv_out.weight", source)[0]
    if enc_out != (2 if double_z else 1) * z_channels:
        kind = "KL autoencoder (mean and logvar)" if double_z else "VQ autoencoder (one latent)"
        raise CheckpointError(
            f"{source}: VAE encoder emits {enc_out} channels for {z_channels} latent channels; "
            f"not a {kind}"
        )
    attn = next(
        (k for k in state_dict if ".attn." in k and k.startswith(("encoder.", "decoder."))), None
    )
    if attn is not None:
        raise CheckpointError(
            f"{source}: VAE has attention inside a resolution level ('{attn}'); only mid-block "
            "attention (attn_resolutions=[], as in Stable Diffusion) is supported"
        )
    groups = norm_groups if norm_groups is not None else math.gcd(32, ch, *widths)
    try:
        return VAEConfig(
            in_channels=in_channels,
            out_channels=_shape(state_dict, "decoder.conv_out.weight", source)[0],
            z_channels=z_channels,
            embed_dim=_shape(state_dict, "post_quant_conv.weight", source)[1],
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=n_res,
            norm_groups=groups,
            double_z=double_z,
            scaling_factor=scaling_factor,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


_ATTN_WEIGHTS = tuple(f".attn_1.{n}.weight" for n in ("q", "k", "v", "proj_out"))


def vae_from_ldm(
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    scaling_factor: float = 0.18215,
    norm_groups: int | None = None,
) -> AutoencoderKL:
    """Build an AutoencoderKL from original-layout weights (prefix stripped), strictly.

    Training-only `loss.*` entries (present in some standalone VAE files) are dropped, and
    attention weights stored as linear (out, in) matrices are viewed as 1x1 convs; everything
    else must match key for key and shape for shape.
    """
    config = vae_config_from_ldm(state_dict, scaling_factor, norm_groups=norm_groups, source=source)
    return build_module(
        lambda: AutoencoderKL(config),
        ldm_first_stage_tensors(state_dict, source),
        what="VAE",
        source=source,
        device=device,
        dtype=dtype,
        key_prefix=LDM_VAE_PREFIX,
    )


def ldm_first_stage_tensors(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Original-layout first-stage tensors as our modules hold them: training-only `loss.*`
    entries dropped, attention weights stored as linear (out, in) matrices viewed as 1x1 convs."""
    sd: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("loss."):
            continue
        if key.endswith(_ATTN_WEIGHTS) and value.ndim == 2:
            value = value[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        sd[key] = value
    if len(sd) != len(state_dict):
        log.debug("%s: dropped %d training-only loss.* entries", source, len(state_dict) - len(sd))
    return sd


def vae_state_dict_to_ldm(vae: AutoencoderKL) -> dict[str, Tensor]:
    """The VAE's weights under their original single-file names (`first_stage_model.` prefix)."""
    return {LDM_VAE_PREFIX + k: v.detach().contiguous() for k, v in vae.state_dict().items()}


# ---------------------------------------------------------------- diffusers layout

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
"""Weight files looked for in a diffusers `vae/` folder, in order of preference."""


def _refuse(source: str, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: unsupported diffusers VAE config: {why}")


def vae_config_from_diffusers(
    config: Mapping[str, Any], *, source: str = "diffusers VAE config"
) -> VAEConfig:
    """Translate a diffusers AutoencoderKL config.json; refuse what our VAE cannot represent.

    Missing keys take diffusers' own defaults. Refused: other autoencoder classes, block types
    other than DownEncoderBlock2D/UpDecoderBlock2D, activations other than SiLU, no quant convs,
    no mid-block attention, and latent shift/normalisation (shift_factor, latents_mean/std),
    which the SD pipeline (latents / scaling_factor) would silently get wrong.
    """
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise _refuse(source, f"_class_name is {cls!r}, only 'AutoencoderKL' is supported")
    widths = tuple(int(w) for w in config.get("block_out_channels", (64,)))
    down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = tuple(config.get("up_block_types", ("UpDecoderBlock2D",)))
    if not widths or len(down) != len(widths) or len(up) != len(widths):
        raise _refuse(
            source, "block_out_channels, down_block_types and up_block_types differ in length"
        )
    odd = [t for t in down if t != "DownEncoderBlock2D"] + [
        t for t in up if t != "UpDecoderBlock2D"
    ]
    if odd:
        raise _refuse(source, f"block type {odd[0]!r} (only DownEncoderBlock2D/UpDecoderBlock2D)")
    if config.get("act_fn", "silu") != "silu":
        raise _refuse(source, f"act_fn={config['act_fn']!r} (only 'silu')")
    for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not config.get(flag, True):
            raise _refuse(source, f"{flag}=false")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise _refuse(source, f"{key} is set (latent shift/normalisation is not supported)")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise _refuse(source, f"block_out_channels {list(widths)} are not multiples of the first")
    latent = int(config.get("latent_channels", 4))
    try:
        return VAEConfig(
            in_channels=int(config.get("in_channels", 3)),
            out_channels=int(config.get("out_channels", 3)),
            z_channels=latent,
            embed_dim=latent,
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=int(config.get("layers_per_block", 1)),
            norm_groups=int(config.get("norm_num_groups", 32)),
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
        )
    except ValueError as e:
        raise _refuse(source, str(e)) from e


_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_ATTN_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names of diffusers checkpoints saved before the attention refactor
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def _rules(n_up: int) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
    """(pattern, rename) pairs; each pattern matches a whole diffusers key."""

    def rule(pattern: str, fn: Callable[[re.Match[str]], str]) -> tuple[re.Pattern[str], Callable]:
        return re.compile(pattern), fn

    def part(name: str) -> str:
        return _RESNET_PARTS.get(name, name)

    return [
        rule(r"(encoder|decoder)\.conv_norm_out\.(\w+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        rule(
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)",
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{part(m[3])}.{m[4]}",
        ),
        rule(
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)",
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        rule(
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{part(m[3])}.{m[4]}",
        ),
        rule(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}",
        ),
        rule(
            r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(\w+)",
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{part(m[3])}.{m[4]}",
        ),
        rule(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0"
            r"|query|key|value|proj_attn)\.(\w+)",
            lambda m: f"{m[1]}.mid.attn_1.{_ATTN_PARTS[m[2]]}.{m[3]}",
        ),
    ]


def vae_state_dict_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename diffusers AutoencoderKL keys to the original layout (no copies: views only).

    Keys it does not recognise pass through unchanged, so the strict load that follows names
    them instead of this function silently dropping them.
    """
    up_ids = [int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    rules = _rules(max(up_ids, default=-1) + 1)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for pattern, rename in rules:
            m = pattern.fullmatch(key)
            if m:
                new = rename(m)
                break
        if (
            ".attn_1." in new
            and new.endswith(".weight")
            and ".norm." not in new
            and value.ndim == 2
        ):
            value = value[:, :, None, None]  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[new] = value
    return out


def read_weights(path: Path, source: str) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{source}: cannot read VAE weights {path.name}: {e}") from e


def read_diffusers_first_stage(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], Path]:
    """(config.json, weights renamed to the original layout, weight file) of a diffusers
    autoencoder folder (`vae/` or `vqvae/`): AutoencoderKL and VQModel share the layout."""
    source = str(folder)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot read VAE config.json: {e}") from e
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{source}: no VAE weights found (looked for {', '.join(WEIGHT_FILES)})"
        )
    log.debug("loading diffusers autoencoder from %s", weights)
    return raw, vae_state_dict_from_diffusers(read_weights(weights, source)), weights


def vae_from_diffusers(
    folder: Path | str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    scaling_factor: float | None = None,
) -> AutoencoderKL:
    """Load a diffusers AutoencoderKL folder (the `vae/` subfolder of a pipeline), strictly;
    `scaling_factor` overrides the config's (a pipeline that fixes it: the x4 upscaler)."""
    folder = Path(folder)
    raw, sd, weights = read_diffusers_first_stage(folder)
    config = vae_config_from_diffusers(raw, source=str(folder))
    if scaling_factor is not None:
        config = replace(config, scaling_factor=scaling_factor)
    return build_module(
        lambda: AutoencoderKL(config),
        sd,
        what="VAE",
        source=str(weights),
        device=device,
        dtype=dtype,
    )
