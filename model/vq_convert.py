"""Checkpoint layouts <-> our VQ autoencoder: CompVis single files (native names below
`first_stage_model.`) and diffusers `VQModel` folders (`vqvae/`).

Encoder and decoder share the KL autoencoder's layouts, so both directions reuse
model/vae_convert.py; only the codebook (`quantize.embedding.weight`, the same name in both
layouts) and the single-latent encoder are VQ's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.vae_convert import (
    LDM_VAE_PREFIX,
    ldm_first_stage_tensors,
    read_diffusers_first_stage,
    vae_config_from_diffusers,
    vae_config_from_ldm,
)
from model.vq import VQAutoencoder, VQConfig
from model.weights import CheckpointError, build_module

CODEBOOK_KEY = "quantize.embedding.weight"
LDM_SCALING_FACTOR = 1.0  # CompVis LDM configs leave scale_factor at its default for VQ models
_VQ_ONLY_KEYS = ("num_vq_embeddings", "vq_embed_dim", "norm_type", "lookup_from_codebook")


def vq_config_from_ldm(
    state_dict: Mapping[str, Tensor],
    scaling_factor: float = LDM_SCALING_FACTOR,
    *,
    source: str = "checkpoint",
) -> VQConfig:
    """Detect a VQ autoencoder from original-layout shapes (`first_stage_model.` stripped)."""
    if CODEBOOK_KEY not in state_dict:
        raise CheckpointError(f"{source}: VQ weights are missing key '{CODEBOOK_KEY}'")
    net = vae_config_from_ldm(state_dict, scaling_factor, source=source, double_z=False)
    n_embed, dim = state_dict[CODEBOOK_KEY].shape
    if dim != net.embed_dim:
        raise CheckpointError(
            f"{source}: codebook vectors have {dim} channels, post_quant_conv takes {net.embed_dim}"
        )
    return VQConfig(net=net, n_embed=int(n_embed))


def vq_from_ldm(
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    scaling_factor: float = LDM_SCALING_FACTOR,
) -> VQAutoencoder:
    """Build a VQAutoencoder from original-layout weights (prefix stripped), strictly."""
    config = vq_config_from_ldm(state_dict, scaling_factor, source=source)
    return build_module(
        lambda: VQAutoencoder(config),
        ldm_first_stage_tensors(state_dict, source),
        what="VQ autoencoder",
        source=source,
        device=device,
        dtype=dtype,
        key_prefix=LDM_VAE_PREFIX,
    )


def vq_state_dict_to_ldm(vq: VQAutoencoder) -> dict[str, Tensor]:
    """The VQ autoencoder's weights under their original single-file names."""
    return {LDM_VAE_PREFIX + k: v.detach() for k, v in vq.state_dict().items()}


def vq_config_from_diffusers(
    config: Mapping[str, Any], *, source: str = "diffusers VQModel config"
) -> VQConfig:
    """Translate a diffusers VQModel config.json (missing keys take VQModel's defaults).

    `lookup_from_codebook` only changes `VQModel.decode(force_not_quantize=True)`, which no LDM
    pipeline calls (they always quantise), so it is accepted and changes nothing; the spatial
    norm (`norm_type="spatial"`, MoVQ) is refused."""
    cls = config.get("_class_name", "VQModel")
    if cls != "VQModel":
        raise CheckpointError(f"{source}: _class_name is {cls!r}, expected 'VQModel'")
    if config.get("norm_type", "group") != "group":
        raise CheckpointError(f"{source}: norm_type={config['norm_type']!r} (only 'group')")
    kl = {k: v for k, v in config.items() if k not in _VQ_ONLY_KEYS and k != "force_upcast"}
    kl = {"latent_channels": 3, **kl, "_class_name": "AutoencoderKL"}  # VQModel's default: 3
    net = vae_config_from_diffusers(kl, source=source)
    embed = config.get("vq_embed_dim") or net.z_channels
    try:
        return VQConfig(
            net=replace(net, double_z=False, embed_dim=int(embed)),
            n_embed=int(config.get("num_vq_embeddings", 256)),
            force_upcast=bool(config.get("force_upcast", False)),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def vq_from_diffusers(
    folder: Path | str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    scaling_factor: float | None = None,
) -> VQAutoencoder:
    """Load a diffusers VQModel folder (`vqvae/` of an LDM pipeline), strictly; a given
    `scaling_factor` overrides the config's (the super-resolution pipeline decodes unscaled).
    With `force_upcast` the weights stay float32 whatever `dtype` asks."""
    folder = Path(folder)
    raw, sd, weights = read_diffusers_first_stage(folder)
    config = vq_config_from_diffusers(raw, source=str(folder))
    if scaling_factor is not None:
        config = replace(config, net=replace(config.net, scaling_factor=scaling_factor))
    return build_module(
        lambda: VQAutoencoder(config),
        sd,
        what="VQ autoencoder",
        source=str(weights),
        device=device,
        dtype=torch.float32 if config.force_upcast else dtype,
    )
