"""VQ-regularised autoencoder of latent diffusion (Rombach et al., CVPR 2022; van den Oord et
al. 2017 for the codebook): the first stage of CompVis' ldm-celebahq-256 and
ldm-super-resolution-4x-openimages.

Encoder and decoder are the KL autoencoder's (model/vae.py) with one latent instead of mean and
logvar. The UNet works on the pre-quantisation latents (`quant_conv` output); decoding snaps each
latent vector to its nearest codebook entry first, as diffusers' `VQModel.decode` does by default
and every LDM pipeline calls it. Attribute names mirror the original keys below
`first_stage_model.` (`quantize.embedding.weight`, `encoder.down.0.block.1.conv2.weight`, ...),
so a CompVis checkpoint loads with one strict `load_state_dict`; conversions live in
model/vq_convert.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.first_stage import PointLatents, decode_in_tiles
from model.vae import Decoder, Encoder, VAEConfig

QUANTIZE_ROWS = 4096  # latent vectors per distance matrix: (rows, n_embed) floats at a time


@dataclass(frozen=True)
class VQConfig:
    """A VQ autoencoder: the encoder/decoder shape (`net`, single latent) plus its codebook."""

    net: VAEConfig  # net.z_channels: encoder output; net.embed_dim: codebook vector size
    n_embed: int = 8192
    force_upcast: bool = False  # diffusers' flag: run this stage in float32 under fp16

    def __post_init__(self) -> None:
        if self.net.double_z:
            raise ValueError("VQConfig: the encoder emits one latent (net.double_z=False)")
        if self.n_embed < 1:
            raise ValueError(f"VQConfig: n_embed must be positive, got {self.n_embed}")


class VectorQuantizer(nn.Module):
    """Nearest codebook entry (Euclidean, as `torch.cdist`) for every latent vector."""

    def __init__(self, n_embed: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)

    def indices(self, z: Tensor) -> Tensor:
        """(B, C, h, w) latents -> (B, h, w) codebook indices, in bounded-memory chunks."""
        B, C, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C).float()  # (B*h*w, C)
        book = self.embedding.weight.float()  # (n_embed, C)
        idx = [torch.cdist(part, book).argmin(dim=1) for part in flat.split(QUANTIZE_ROWS)]
        return torch.cat(idx).view(B, H, W)

    def forward(self, z: Tensor) -> Tensor:
        """(B, C, h, w) latents -> the same shape, every vector replaced by its codebook entry."""
        return self.embedding(self.indices(z)).permute(0, 3, 1, 2).to(z.dtype)  # (B, C, h, w)


class VQAutoencoder(nn.Module):
    """The LDM VQ first stage: `encode` images to latents, `decode` (quantise, then decode)."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        net = config.net
        self.encoder = Encoder(net)
        self.decoder = Decoder(net)
        self.quant_conv = nn.Conv2d(net.z_channels, net.embed_dim, 1)
        self.quantize = VectorQuantizer(config.n_embed, net.embed_dim)
        self.post_quant_conv = nn.Conv2d(net.embed_dim, net.z_channels, 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.net.scaling_factor

    @property
    def downsampling_factor(self) -> int:
        return self.config.net.downsampling_factor

    @property
    def latent_channels(self) -> int:
        return self.config.net.embed_dim

    def encode(self, images: Tensor) -> PointLatents:
        """Images (B, in, H, W) in [-1, 1] -> unscaled pre-quantisation latents (B, embed, H/f, W/f)."""
        x = images.to(self.quant_conv.weight.dtype)
        return PointLatents(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor, tile: int | None = None) -> Tensor:
        """Unscaled latents (B, embed, h, w) -> images in about [-1, 1] (not clamped).

        Quantisation and post_quant_conv act per position, so they run on the whole latent;
        with `tile` only the decoder runs tile by tile (model.first_stage.decode_in_tiles)."""
        z = z.to(self.post_quant_conv.weight.dtype)
        h = self.post_quant_conv(self.quantize(z))  # (B, z, h, w)
        if tile is None:
            return self.decoder(h)  # (B, out, h*f, w*f)
        return decode_in_tiles(self.decoder, h, self.downsampling_factor, tile, tile // 4)
