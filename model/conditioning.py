"""What the UNet is conditioned on, as one value keyed by kind (the LDM paper's two ways).

`crossattn` is the text context the spatial transformers attend to; `concat` holds spatially
aligned channels appended to the (scaled) latents — the inpainting UNets' mask and masked-image
latents, the paper's concatenation conditioning; with `scale_concat` they go through the
sampler's input scaling with the latents, as diffusers' LDMSuperResolutionPipeline scales its
low-res image. A model without text conditioning gets an empty (B, 0, 0) `crossattn`. Later families add their kinds here (pooled
vectors, class labels, time ids) so that the UNet, the denoise step and the engine carry them
without new parameters. Rows of a batch are concatenated in one place (`cat`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


def pad_rows(t: Tensor, n: int) -> Tensor:
    """``t``'s rows followed by copies of its last row, ``n`` rows in all."""
    extra = n - t.shape[0]
    return t if extra <= 0 else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of a batch of B rows; every tensor's first dimension is B."""

    crossattn: Tensor  # (B, N, D) text context
    concat: Tensor | None = None  # (B, C_extra, h, w) appended to the UNet input after scaling
    scale_concat: bool = False  # concat is input-scaled with the latents (LDM super-resolution)

    @property
    def rows(self) -> int:
        return self.crossattn.shape[0]

    def expand(self, n: int) -> Conditioning:
        """The same single-row conditioning for n rows (a view, no copy)."""
        return Conditioning(
            crossattn=self.crossattn.expand(n, -1, -1),
            concat=None if self.concat is None else self.concat.expand(n, -1, -1, -1),
            scale_concat=self.scale_concat,
        )

    def with_text(self, crossattn: Tensor) -> Conditioning:
        """The same spatial conditioning with another text context (CFG's unconditional row)."""
        return replace(self, crossattn=crossattn)

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        return Conditioning(
            crossattn=self.crossattn.to(device, dtype),
            concat=None if self.concat is None else self.concat.to(device, dtype),
            scale_concat=self.scale_concat,
        )

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """Apply ``fn`` to every per-row tensor (each kind has rows first)."""
        changes = {
            f.name: fn(v) for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)
        }
        return replace(self, **changes)

    def pad_rows(self, n: int) -> Conditioning:
        """These rows, then copies of the last one, ``n`` in all (bucketed compiled calls)."""
        return self.map_rows(lambda t: pad_rows(t, n))

    def rows_slice(self, start: int, stop: int) -> Conditioning:
        return self.map_rows(lambda t: t[start:stop])

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Rows of several conditionings as one batch; all must carry the same kinds."""
        kinds = {(c.concat is None, c.scale_concat) for c in items}
        if len(kinds) != 1:
            raise ValueError("cannot batch conditionings with and without concat channels")
        concat = None if items[0].concat is None else torch.cat([c.concat for c in items])  # type: ignore[misc]
        crossattn = torch.cat([c.crossattn for c in items])
        return Conditioning(crossattn, concat=concat, scale_concat=items[0].scale_concat)
