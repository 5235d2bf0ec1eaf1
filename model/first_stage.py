"""The first stage as one interface: what the pipeline needs of an autoencoder, KL or VQ.

The pipeline encodes input images to latents and decodes final latents to pixels; it never
needs to know how the latent space is regularised (Rombach et al. 2022, sec. 3: KL or VQ).
`FirstStage` is that interface; `model.vae.AutoencoderKL` and `model.vq.VQAutoencoder`
implement it. `decode_in_tiles` bounds decoder memory for large outputs (the upscalers'):
the decoder runs on overlapping latent tiles whose pixels are blended with linear ramps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn


class Posterior(Protocol):
    """What `encode` returns: latents to sample (KL) or take as they are (VQ)."""

    def sample(self, generator: torch.Generator | None = None) -> Tensor: ...

    def mode(self) -> Tensor: ...

    def float(self) -> Posterior: ...


class FirstStage(Protocol):
    """An LDM autoencoder: images in [-1, 1] <-> unscaled latents (UNet latents / scaling)."""

    @property
    def latent_channels(self) -> int: ...

    @property
    def downsampling_factor(self) -> int: ...

    @property
    def scaling_factor(self) -> float: ...

    def encode(self, images: Tensor) -> Posterior: ...

    def decode(self, z: Tensor, tile: int | None = None) -> Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class PointLatents(NamedTuple):
    """A deterministic encoding (VQ: the pre-quantisation latents); sampling draws nothing, so
    the noise convention's later draws are not shifted."""

    latents: Tensor  # (B, C, h, w)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.latents

    def mode(self) -> Tensor:
        return self.latents

    def float(self) -> PointLatents:
        return PointLatents(self.latents.float())


def _starts(n: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every `stride`, the last one flush with the end."""
    if n <= tile:
        return [0]
    return [*range(0, n - tile, stride), n - tile]


def _ramp(length: int, start: int, end: int, total: int, overlap: int) -> Tensor:
    """Blend weights along one axis of a decoded tile: rising over the overlap where a tile
    precedes it, falling where one follows; positive everywhere."""
    w = torch.ones(length)
    if overlap > 0:
        up = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if start > 0:
            w[:overlap] = up
        if end < total:
            w[-overlap:] = torch.minimum(w[-overlap:], up.flip(0))
    return w


def decode_in_tiles(
    decoder: Callable[[Tensor], Tensor], h: Tensor, factor: int, tile: int, overlap: int
) -> Tensor:
    """Decode (B, C, H, W) decoder inputs tile by tile: pixel tiles of `tile * factor` at most,
    neighbours overlapping by `overlap` latents, blended; float32 (B, out, H*f, W*f) out.

    Peak activation memory is one tile's, so it no longer grows with the output. The seams are
    not exact: the decoder's convolutions and mid-block attention see only their tile (the
    figures are in docs/ARCHITECTURE.md and tests/test_first_stage.py)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {overlap}")
    B, _, H, W = h.shape
    out: Tensor | None = None
    weight = torch.zeros((1, 1, H * factor, W * factor), device=h.device)
    for y in _starts(H, tile, tile - overlap):
        for x in _starts(W, tile, tile - overlap):
            th, tw = min(tile, H - y), min(tile, W - x)
            part = decoder(h[:, :, y : y + th, x : x + tw]).float()  # (B, out, th*f, tw*f)
            if out is None:
                out = torch.zeros((B, part.shape[1], H * factor, W * factor), device=h.device)
            wy = _ramp(th * factor, y, y + th, H, overlap * factor)
            wx = _ramp(tw * factor, x, x + tw, W, overlap * factor)
            w = (wy[:, None] * wx[None, :]).to(h.device)[None, None]  # (1, 1, th*f, tw*f)
            ys, xs = slice(y * factor, (y + th) * factor), slice(x * factor, (x + tw) * factor)
            out[:, :, ys, xs] += part * w
            weight[:, :, ys, xs] += w
    assert out is not None
    return out / weight
