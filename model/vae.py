"""KL-regularised autoencoder of latent diffusion (Rombach et al., CVPR 2022).

Module attribute names mirror the original single-file checkpoint keys below
`first_stage_model.` (`encoder.down.0.block.1.conv2.weight`, `decoder.up.3.upsample.conv.bias`,
...), so an SD checkpoint loads with one strict `load_state_dict` and no mapping table.
As in the original, the decoder's `up` list is indexed by resolution level, not by order of
use: `up.{L-1}` (lowest resolution) runs first. Attention sits in the middle blocks only
(`attn_resolutions=[]`, as in every SD VAE).

Checkpoint conversions (original single-file layout, diffusers layout) live in
`model/vae_convert.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.first_stage import decode_in_tiles


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of an LDM KL autoencoder (defaults: SD 1.x / 2.x, f=8, 4 latent channels)."""

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4  # channels of the decoder input / half the encoder output
    embed_dim: int = 4  # channels of the latent the UNet sees (after quant_conv)
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    double_z: bool = True  # the encoder emits mean and logvar (KL); False: one latent (VQ)
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        if not self.ch_mult or min(self.ch_mult) < 1 or self.ch < 1 or self.num_res_blocks < 1:
            raise ValueError(f"VAEConfig: invalid widths/depth in {self}")
        bad = [w for w in self.widths if w % self.norm_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: norm_groups={self.norm_groups} does not divide channel width {bad[0]}"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each resolution level."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim


TINY_VAE_CONFIG = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=32)
"""Tiny random-weight VAE for tests and the demo model: f=8 like SD, 4 latent channels, widths
(32, 32, 64, 64) so diffusers' default 32 norm groups also fit."""


class LatentDistribution(NamedTuple):
    """Diagonal Gaussian posterior q(z|x); unpacks as `(mean, logvar)`. Shapes (B, C, h, w)."""

    mean: Tensor
    logvar: Tensor  # already clamped to [-30, 20] as in the original

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def float(self) -> LatentDistribution:
        return LatentDistribution(self.mean.float(), self.logvar.float())

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw z = mean + std * eps; eps comes from `generator` (on its own device) if given."""
        gen_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(
            self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps.to(self.mean.device)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1 conv when widths differ) shortcut; no time input."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, q/k/v/proj_out as 1x1 convs."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:
            return t.reshape(B, 1, C, H * W).transpose(-1, -2)  # (B, 1, HW, C)

        out = F.scaled_dot_product_attention(
            tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h))
        )
        out = out.transpose(-1, -2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom only, exactly as the original."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution level: `block` (res blocks) then an optional `downsample`/`upsample`."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Images (B, in, H, W) -> moments (B, 2*z, H/f, W/f), or latents (B, z, ...) without double_z."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths, g = cfg.widths, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, w, g))
                c = w
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(c), "downsample"))
        self.mid = MidBlock(c, g)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, (2 if cfg.double_z else 1) * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z or z, H/f, W/f)


class Decoder(nn.Module):
    """Latents (B, z, h, w) -> images (B, out, h*f, w*f); `up[i]` is level i, run from last to 0."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths, g = cfg.widths, cfg.norm_groups
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = MidBlock(c, g)
        levels: list[Level] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, widths[i], g))
                c = widths[i]
            levels.insert(0, Level(blocks, Upsample(c) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, C_last, h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, h*f, w*f)


class AutoencoderKL(nn.Module):
    """The LDM first stage: `encode` images to a latent Gaussian, `decode` latents to images."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if not config.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (mean and logvar)")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    def encode(self, images: Tensor) -> LatentDistribution:
        """Images (B, in, H, W) in [-1, 1] (H, W multiples of f) -> posterior over unscaled latents.

        The input is cast to the weights' dtype; multiply a sample by `scaling_factor` to get
        the latents the UNet works with.
        """
        x = images.to(self.quant_conv.weight.dtype)
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed, H/f, W/f)
        mean, logvar = moments.chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: Tensor, tile: int | None = None) -> Tensor:
        """Unscaled latents (B, embed, h, w), i.e. `latents / scaling_factor` -> images in about [-1, 1].

        The input is cast to the weights' dtype; the output is not clamped (callers clamp).
        With `tile`, the decoder runs on overlapping tiles of that latent side (bounded memory,
        see model.first_stage.decode_in_tiles).
        """
        h = self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype))  # pointwise
        if tile is None:
            return self.decoder(h)  # (B, out, h*f, w*f)
        return decode_in_tiles(self.decoder, h, self.downsampling_factor, tile, tile // 4)
