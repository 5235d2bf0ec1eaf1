"""The LDM denoising UNet with spatial-transformer cross-attention (Rombach et al., 2022).

Module attribute names mirror the original checkpoints' keys below `model.diffusion_model.`
(`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`, ...), so a single-file
checkpoint loads with one strict `load_state_dict` and no mapping table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.conditioning import Conditioning

LABEL_KINDS = ("classes", "timestep", "projection", "text_time")


def _per_level(value: int | tuple[int, ...], level: int) -> int:
    return value if isinstance(value, int) else value[level]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of one UNet; defaults are Stable Diffusion 1.x.

    Per-level fields take one int (every level) or a tuple with one entry per level of
    `channel_mult`; the up path mirrors the down path unless its own fields say otherwise.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int | tuple[int, ...] = 2  # per level (down); the up path has one more
    attention_levels: tuple[int, ...] = (0, 1, 2)  # down levels (0 = full size) with attention
    attention_levels_up: tuple[int, ...] | None = None  # up levels with attention (None: same)
    num_heads: int | tuple[int, ...] | None = 8  # heads per level (SD 1.x: 8); mid = last ...
    head_dim: int | None = None  # ... or fixed channels per head (SD 2.x, SDXL: 64)
    transformer_depth: int | tuple[int, ...] = 1  # transformer blocks per level (SDXL 1, 2, 10)
    transformer_depth_up: int | tuple[int, ...] | None = None  # the up path's (None: same)
    transformer_depth_middle: int | None = None  # None: the last level's
    context_dim: int = 768
    use_linear_projection: bool = False  # SD 2.x projects in/out of transformers with Linear
    # Levels (down and up) and the middle block whose transformers' first attention attends to
    # the text instead of the image (the original's disable_self_attn; the x4 upscaler's).
    cross_only_levels: tuple[int, ...] = ()
    cross_only_middle: bool = False
    upcast_attention: bool = False  # compute attention in float32 under fp16 (SD 2.1-v)
    norm_groups: int = 32
    # What `label_emb` adds to the time embedding: None; "classes" (a table of num_classes
    # rows indexed by cond.class_labels); an MLP over "timestep" (the sinusoid of
    # cond.class_labels), "projection" (cond.class_labels as a vector) or "text_time" (SDXL:
    # cond.pooled followed by the sinusoids of cond.time_ids).
    label: str | None = None
    num_classes: int | None = None  # "classes"
    adm_in_channels: int | None = None  # the MLP's input width ("projection", "text_time")
    addition_time_embed_dim: int = 256  # "text_time": sinusoid width per time id

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        for name in ("num_res_blocks", "num_heads", "transformer_depth", "transformer_depth_up"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                raise ValueError(f"UNetConfig.{name} has {len(value)} entries for {levels} levels")
        if self.num_heads is None and self.head_dim is None:
            raise ValueError("UNetConfig needs num_heads or head_dim")
        if self.label is not None and self.label not in LABEL_KINDS:
            raise ValueError(f"UNetConfig.label must be one of {LABEL_KINDS}, got {self.label!r}")
        if self.label == "classes" and not self.num_classes:
            raise ValueError("UNetConfig.label 'classes' needs num_classes")
        if self.label in ("projection", "text_time") and not self.adm_in_channels:
            raise ValueError(f"UNetConfig.label {self.label!r} needs adm_in_channels")

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def res_blocks(self, level: int) -> int:
        """ResBlocks of a down level (its up level has one more)."""
        return _per_level(self.num_res_blocks, level)

    def has_attention(self, level: int, up: bool = False) -> bool:
        if up and self.attention_levels_up is not None:
            return level in self.attention_levels_up
        return level in self.attention_levels

    def depth(self, level: int, up: bool = False) -> int:
        """Transformer blocks per spatial transformer at a level; level -1 = the middle block."""
        if level < 0 and self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        depths = self.transformer_depth
        if up and self.transformer_depth_up is not None:
            depths = self.transformer_depth_up
        return _per_level(depths, level)

    def heads_for(self, level: int) -> tuple[int, int]:
        """(number of heads, channels per head) at a level; level -1 = the middle block."""
        channels = self.model_channels * self.channel_mult[level]
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        heads = _per_level(self.num_heads, level)  # type: ignore[arg-type]
        return heads, channels // heads

    def input_layout(self) -> list[tuple[int, int | None]]:
        """(level, ResBlock index) of every input block after conv_in; None = a downsample."""
        out: list[tuple[int, int | None]] = []
        for level in range(self.levels):
            out += [(level, j) for j in range(self.res_blocks(level))]
            if level != self.levels - 1:
                out.append((level, None))
        return out

    def output_layout(self) -> list[tuple[int, int]]:
        """(level, ResBlock index) of every output block; the last of a level > 0 upsamples."""
        return [
            (level, j)
            for level in reversed(range(self.levels))
            for j in range(self.res_blocks(level) + 1)
        ]

    @property
    def label_input_dim(self) -> int | None:
        """Width of the vector label_emb's MLP takes (None: no MLP)."""
        if self.label == "timestep":
            return self.model_channels
        return self.adm_in_channels if self.label in ("projection", "text_time") else None


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of per-sample timesteps, (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as the original LDM does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added between them, plus a skip path."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(
        self, query_dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N|M, heads*d)
        q, k, v = (
            t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v)
        )
        dtype = q.dtype
        if self.upcast and dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = out.to(dtype).transpose(1, 2).reshape(b, n, -1)  # (B, N, heads*d)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection of the transformer's feed-forward (Shazeer, 2020)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; pre-norm residuals."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        heads: int,
        head_dim: int,
        upcast: bool,
        cross_only: bool = False,
    ) -> None:
        super().__init__()
        # cross_only: the first attention attends to the text too (the original's
        # disable_self_attn, diffusers' only_cross_attention; the x4 upscaler's levels)
        self.cross_only = cross_only
        self.attn1 = CrossAttention(
            dim, context_dim if cross_only else dim, heads, head_dim, upcast
        )
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.cross_only else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the (H*W) positions of a feature map, conditioned on the text."""

    def __init__(
        self, channels: int, cfg: UNetConfig, level: int, depth: int, middle: bool = False
    ) -> None:
        super().__init__()
        heads, head_dim = cfg.heads_for(level)
        cross_only = cfg.cross_only_middle if middle else level in cfg.cross_only_levels
        inner = heads * head_dim
        self.use_linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        if self.use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, cfg.context_dim, heads, head_dim, cfg.upcast_attention, cross_only
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, inner)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, inner|C, H, W)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Nearest x2, or to `size` when the skip it meets had an odd side."""
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: time embedding or text context."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


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
