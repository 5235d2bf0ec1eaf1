"""The LDM denoising UNet with spatial-transformer cross-attention (Rombach et al., 2022).

Module attribute names mirror the original checkpoints' keys below `model.diffusion_model.`
(`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`, ...), so a single-file
checkpoint loads with one strict `load_state_dict` and no mapping table.

This module assembles the model (:class:`UNetModel`: time and label embeddings, the input,
middle and output blocks) from the parts beside it: the architecture in
:mod:`model.unet_config`, the ResBlocks, resampling and the block container in
:mod:`model.unet_blocks`, the spatial transformers in :mod:`model.unet_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from model.conditioning import Conditioning
from model.unet_attention import SpatialTransformer
from model.unet_blocks import (
    Downsample,
    GroupNorm32,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    timestep_embedding,
)
from model.unet_config import UNetConfig


def _label_embedding(cfg: UNetConfig, emb_dim: int) -> nn.Module | None:
    """label_emb: a class table (original LDM) or an MLP over a vector (SGM's "sequential")."""
    if cfg.label == "classes":
        return nn.Embedding(cfg.num_classes, emb_dim)  # type: ignore[arg-type]
    width = cfg.label_input_dim
    if width is None:
        return None
    mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    return nn.Sequential(mlp)  # keys label_emb.0.0.*, label_emb.0.2.*


def prefers_channels_last(device: torch.device | str) -> bool:
    """Whether the pipeline runs the UNet NHWC on this device (measured on CPU only)."""
    return torch.device(device).type == "cpu"


class UNetModel(nn.Module):
    """eps (or v) = unet(x, t, cond), each row with its own timestep and conditioning."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self._channels_last = False  # see use_channels_last()
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        self.label_emb = _label_embedding(cfg, emb_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        )
        skip_channels, ch = [mc], mc
        for level, j in cfg.input_layout():
            if j is None:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            else:
                layers: list[nn.Module] = [
                    ResBlock(ch, emb_dim, mc * cfg.channel_mult[level], groups)
                ]
                ch = mc * cfg.channel_mult[level]
                if cfg.has_attention(level):
                    layers.append(SpatialTransformer(ch, cfg, level, cfg.depth(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups),
            SpatialTransformer(ch, cfg, cfg.levels - 1, cfg.depth(-1), middle=True),
            ResBlock(ch, emb_dim, ch, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, j in cfg.output_layout():
            layers = [
                ResBlock(ch + skip_channels.pop(), emb_dim, mc * cfg.channel_mult[level], groups)
            ]
            ch = mc * cfg.channel_mult[level]
            if cfg.has_attention(level, up=True):
                layers.append(SpatialTransformer(ch, cfg, level, cfg.depth(level, up=True)))
            if level and j == cfg.res_blocks(level):
                layers.append(Upsample(ch))
            self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    @property
    def channels_last(self) -> bool:
        return self._channels_last

    def use_channels_last(self) -> UNetModel:
        """Keep conv weights and activations NHWC (``torch.channels_last``).

        Why: on CPU, oneDNN runs NHWC convolutions without reordering, and the spatial
        transformers' (B, H*W, C) token views of an NHWC feature map are free instead of a
        copy in and a copy out. Same weights and maths; sums may round in another order
        (|diff| ~1e-5 at the SD 1.5 shape). Measured by bench/unet.py; used on CPU only
        (model.pipeline.Pipeline), GPUs keep the default layout until measured there.
        """
        self.to(memory_format=torch.channels_last)  # no copy of weights already NHWC
        self._channels_last = True
        return self

    def _label_input(self, cond: Conditioning) -> torch.Tensor:
        """What label_emb embeds, built from the conditioning kinds the config names."""
        cfg = self.config
        if cfg.label == "text_time":
            if cond.pooled is None or cond.time_ids is None:
                raise ValueError("this UNet needs pooled text embeddings and time ids")
            ids = cond.time_ids.float()  # (B, K)
            waves = timestep_embedding(ids.flatten(), cfg.addition_time_embed_dim)  # (B*K, d)
            vector = torch.cat([cond.pooled.float(), waves.reshape(ids.shape[0], -1)], dim=-1)
            return vector.to(self.dtype)  # (B, adm_in_channels)
        if cond.class_labels is None:
            raise ValueError(f"this UNet needs class labels (label embedding {cfg.label!r})")
        if cfg.label == "classes":
            return cond.class_labels.long()  # (B,)
        if cfg.label == "timestep":
            return timestep_embedding(cond.class_labels, cfg.model_channels).to(self.dtype)
        return cond.class_labels.to(self.dtype)  # "projection": (B, adm_in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x (B, C_lat, h, w) scaled latents, t (B,), cond -> (B, C_out, h, w).

        Concat channels (inpainting's mask + masked-image latents) are appended to `x` here,
        after the sampler's input scaling, so that every caller conditions the same way.
        """
        dtype = self.dtype
        emb = self.time_embed(
            timestep_embedding(t, self.config.model_channels).to(dtype)
        )  # (B, 4*mc)
        if self.label_emb is not None:
            emb = emb + self.label_emb(self._label_input(cond).to(emb.device)).to(dtype)
        if cond.concat is not None:
            x = torch.cat([x, cond.concat.to(x.device, x.dtype)], dim=1)  # (B, C_in, h, w)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UNet takes {self.config.in_channels} input channels, got {x.shape[1]}"
            )
        h, context = x.to(dtype), cond.crossattn.to(dtype)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            size = tuple(skips[-1].shape[-2:]) if skips else None  # the next skip's (h, w)
            h = block(h, emb, context, size)
        return self.out(h).contiguous()  # callers get the default layout whatever ours
