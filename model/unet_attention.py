"""The UNet's spatial-transformer cross-attention: attention (SDPA), the GEGLU feed-forward,
the transformer block and the spatial transformer over a feature map's positions.

Attribute names mirror the original checkpoints' keys (see :mod:`model.unet`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.unet_config import UNetConfig


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
