"""The UNet without cross-attention (diffusers' UNet2DModel) of the unconditional and
super-resolution LDMs (Rombach et al. 2022: ldm-celebahq-256, ldm-super-resolution-4x-openimages).

Residual blocks with a timestep embedding, single-scale self-attention blocks (DownBlock2D /
AttnDownBlock2D / UpBlock2D / AttnUpBlock2D, a UNetMidBlock2D with attention), conditioning only
by concatenation: `Conditioning.concat` (the super-resolution model's low-res image) is
appended to the latents' channels. These models are published as diffusers folders, so module
names follow diffusers' keys (`down_blocks.1.attentions.0.to_q.weight`, ...) and a folder loads
strictly with no mapping; the deprecated attention names of older saves (`query`, `key`,
`value`, `proj_attn`) are renamed by `unet2d_state_dict_from_diffusers`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.conditioning import Conditioning
from model.weights import CheckpointError


@dataclass(frozen=True)
class UNet2DConfig:
    """Architecture of a diffusers UNet2DModel (defaults: diffusers' own)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    attention_levels: tuple[bool, ...] = (False, True, True, True)  # per down level; up mirrors
    layers_per_block: int = 2
    attention_head_dim: int | None = 8  # None: one head per block (head dim = width)
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None  # mid-block attention norm; None: see mid_attn_groups
    norm_eps: float = 1e-5
    scale_shift: bool = False  # resnet_time_scale_shift == "scale_shift"
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: int | None = None  # None: 4 x block_out_channels[0]
    downsample_padding: int = 1
    mid_block: bool = True
    mid_attention: bool = True
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    sample_size: int = 32  # latent side of the training images

    @property
    def time_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def mid_attn_groups(self) -> int | None:
        """diffusers: the mid attention's norm groups, none at all under scale-shift by default."""
        if self.attn_norm_num_groups is not None:
            return self.attn_norm_num_groups
        return None if self.scale_shift else self.norm_num_groups


_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


def unet2d_config_from_diffusers(cfg: Mapping[str, Any], *, source: str) -> UNet2DConfig:
    """Translate a UNet2DModel config.json; refuse what this UNet does not implement."""

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: unsupported UNet2DModel config: {why}")

    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise refuse(f"_class_name is {cfg['_class_name']!r}")
    down = tuple(cfg.get("down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3))
    up = tuple(cfg.get("up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)))
    widths = tuple(int(w) for w in cfg.get("block_out_channels", (224, 448, 672, 896)))
    if len(down) != len(widths) or len(up) != len(widths):
        raise refuse("block_out_channels, down_block_types and up_block_types differ in length")
    odd = [t for t in down if t not in _DOWN] + [t for t in up if t not in _UP]
    if odd:
        raise refuse(f"block type {odd[0]!r}")
    levels = tuple(_DOWN[t] for t in down)
    if tuple(_UP[t] for t in reversed(up)) != levels:
        raise refuse("up blocks do not mirror the down blocks' attention")
    for key, value in (
        ("time_embedding_type", "positional"),
        ("act_fn", "silu"),
        ("downsample_type", "conv"),
        ("upsample_type", "conv"),
    ):
        if cfg.get(key, value) != value:
            raise refuse(f"{key}={cfg[key]!r} (only {value!r})")
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise refuse("class embeddings")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise refuse(f"resnet_time_scale_shift={shift!r}")
    mid = cfg.get("mid_block_type", "UNetMidBlock2D")
    if mid not in ("UNetMidBlock2D", None):
        raise refuse(f"mid_block_type={mid!r}")
    side = cfg.get("sample_size") or 32
    head = cfg.get("attention_head_dim", 8)
    return UNet2DConfig(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        block_out_channels=widths,
        attention_levels=levels,
        layers_per_block=int(cfg.get("layers_per_block", 2)),
        attention_head_dim=None if head is None else int(head),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        attn_norm_num_groups=cfg.get("attn_norm_num_groups"),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        scale_shift=shift == "scale_shift",
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)),
        time_embedding_dim=cfg.get("time_embedding_dim"),
        downsample_padding=int(cfg.get("downsample_padding", 1)),
        mid_block=mid is not None,
        mid_attention=bool(cfg.get("add_attention", True)),
        mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1)),
        center_input_sample=bool(cfg.get("center_input_sample", False)),
        sample_size=int(side[0] if isinstance(side, list | tuple) else side),
    )


_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def unet2d_state_dict_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers keys as this module names them: the same, but for pre-refactor attention names."""
    pattern = re.compile(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)(\.\w+)")
    out = {}
    for key, value in sd.items():
        m = pattern.fullmatch(key)
        out[f"{m[1]}{_OLD_ATTENTION[m[2]]}{m[3]}" if m else key] = value
    return out


def timestep_embedding(t: Tensor, dim: int, flip: bool, shift: float) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of per-row timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(c_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """Norm-SiLU-conv, add (or scale-shift by) the time embedding, norm-SiLU-conv, shortcut."""

    def __init__(self, c_in: int, c_out: int, cfg: UNet2DConfig, out_scale: float = 1.0) -> None:
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.scale_shift, self.out_scale = cfg.scale_shift, out_scale
        self.norm1 = nn.GroupNorm(g, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_dim, 2 * c_out if cfg.scale_shift else c_out)
        self.norm2 = nn.GroupNorm(g, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        e = self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(F.silu(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.out_scale


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(
        self, channels: int, head_dim: int | None, groups: int | None, eps: float, out_scale: float
    ) -> None:
        super().__init__()
        head_dim = head_dim or channels
        self.heads, self.out_scale = channels // head_dim, out_scale
        inner = self.heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups else None
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = x if self.group_norm is None else self.group_norm(x)
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)

        def heads(t: Tensor) -> Tensor:
            return t.view(B, H * W, self.heads, -1).transpose(1, 2)  # (B, heads, HW, d)

        out = F.scaled_dot_product_attention(
            heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h))
        )
        out = self.to_out[0](out.transpose(1, 2).reshape(B, H * W, -1))  # (B, HW, C)
        return (out.transpose(1, 2).reshape(B, C, H, W) + x) / self.out_scale


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # right/bottom only, as diffusers without padding
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D: res blocks (each followed by attention), then downsample."""

    def __init__(self, c_in: int, c_out: int, attn: bool, last: bool, cfg: UNet2DConfig) -> None:
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, cfg) for i in range(n)]
        )
        g, hd = cfg.norm_num_groups, cfg.attention_head_dim
        self.attentions = nn.ModuleList(
            [Attention(c_out, hd, g, cfg.norm_eps, 1.0) for _ in range(n)] if attn else []
        )
        self.downsamplers = (
            None if last else nn.ModuleList([Downsample2D(c_out, cfg.downsample_padding)])
        )

    def forward(self, x: Tensor, temb: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if len(self.attentions):
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D: res blocks on (x, skip) concatenations, attention, upsample."""

    def __init__(
        self, c_skip_last: int, c_prev: int, c_out: int, attn: bool, last: bool, cfg: UNet2DConfig
    ) -> None:
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    (c_prev if i == 0 else c_out) + (c_skip_last if i == n - 1 else c_out),
                    c_out,
                    cfg,
                )
                for i in range(n)
            ]
        )
        g, hd = cfg.norm_num_groups, cfg.attention_head_dim
        self.attentions = nn.ModuleList(
            [Attention(c_out, hd, g, cfg.norm_eps, 1.0) for _ in range(n)] if attn else []
        )
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(c_out)])

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if len(self.attentions):
                x = self.attentions[i](x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class MidBlock(nn.Module):
    """UNetMidBlock2D: res block, (attention), res block, all at the lowest resolution."""

    def __init__(self, c: int, cfg: UNet2DConfig) -> None:
        super().__init__()
        s = cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, cfg, s), ResnetBlock2D(c, c, cfg, s)])
        hd = cfg.attention_head_dim
        self.attentions = nn.ModuleList(
            [Attention(c, hd, cfg.mid_attn_groups, cfg.norm_eps, s)] if cfg.mid_attention else []
        )

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class UNet2DModel(nn.Module):
    """`unet(x, t, cond)`: latents (B, C, h, w), per-row timesteps (B,), concat conditioning;
    h and w must divide by 2^(levels - 1)."""

    def __init__(self, config: UNet2DConfig) -> None:
        super().__init__()
        self.config = config
        widths, cfg = config.block_out_channels, config
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], cfg.time_dim)
        last = len(widths) - 1
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], w, cfg.attention_levels[i], i == last, cfg)
            for i, w in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], cfg) if cfg.mid_block else None
        rev = list(reversed(widths))
        self.up_blocks = nn.ModuleList(
            UpBlock(
                rev[min(i + 1, last)],
                rev[max(i - 1, 0)],
                w,
                cfg.attention_levels[last - i],
                i == last,
                cfg,
            )
            for i, w in enumerate(rev)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)
        self._channels_last = False

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def use_channels_last(self) -> None:
        """Keep conv weights and activations NHWC (faster oneDNN convs on CPU)."""
        self.to(memory_format=torch.channels_last)
        self._channels_last = True

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.concat is not None:
            x = torch.cat([x, cond.concat.to(x.dtype)], dim=1)  # (B, in_channels, h, w)
        x = x.to(self.dtype)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cfg = self.config
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.to(self.dtype))  # (B, time_dim)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, more = block(h, temb)
            skips.extend(more)
        if self.mid_block is not None:
            h = self.mid_block(h, temb)
        for block in self.up_blocks:
            h = block(h, skips, temb)
        out = self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h, w)
        return out.contiguous()
