"""What the UNet is conditioned on, as one value keyed by kind (the LDM paper's two ways).

`crossattn` is the text context the spatial transformers attend to; `concat` holds spatially
aligned channels appended to the (scaled) latents — the inpainting UNets' mask and masked-image
latents, the paper's concatenation conditioning; with `scale_concat` they go through the
sampler's input scaling with the latents, as diffusers' LDMSuperResolutionPipeline scales its
low-res image. A model without text conditioning gets an empty (B, 0, 0) `crossattn`. Later families add their kinds here (pooled
vectors, class labels, time ids) so that the UNet, the denoise step and the engine carry them
without new parameters. Rows of a batch are concatenated in one place (`cat`).

`loras` is per-row data of another kind: the LoRA adapters (and multipliers) each row's job
uses, kept aligned with the rows by `cat` and `expand` (None: no row uses any).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model.lora_layers import AdapterSet


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
    loras: tuple[AdapterSet, ...] | None = None  # (B,) each row's adapters; None: none

    @property
    def rows(self) -> int:
        return self.crossattn.shape[0]

    def expand(self, n: int) -> Conditioning:
        """The same single-row conditioning for n rows (a view, no copy)."""
        return Conditioning(
            crossattn=self.crossattn.expand(n, -1, -1),
            concat=None if self.concat is None else self.concat.expand(n, -1, -1, -1),
            scale_concat=self.scale_concat,
            loras=None if self.loras is None else self.loras * n,
        )

    def with_text(self, crossattn: Tensor) -> Conditioning:
        """The same spatial conditioning with another text context (CFG's unconditional row)."""
        return replace(self, crossattn=crossattn)

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        return Conditioning(
            crossattn=self.crossattn.to(device, dtype),
            concat=None if self.concat is None else self.concat.to(device, dtype),
            scale_concat=self.scale_concat,
            loras=self.loras,
        )

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """Apply ``fn`` to every per-row tensor (each kind has rows first)."""
        changes = {
            f.name: fn(v) for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)
        }
        return replace(self, **changes)

    def pad_rows(self, n: int) -> Conditioning:
        """These rows, then copies of the last one, ``n`` in all (bucketed compiled calls)."""
        padded = self.map_rows(lambda t: pad_rows(t, n))
        if self.loras is None or len(self.loras) >= n:
            return padded
        return replace(padded, loras=self.loras + self.loras[-1:] * (n - len(self.loras)))

    def rows_slice(self, start: int, stop: int) -> Conditioning:
        part = self.map_rows(lambda t: t[start:stop])
        return part if self.loras is None else replace(part, loras=self.loras[start:stop])

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Rows of several conditionings as one batch; all must carry the same kinds."""
        kinds = {(c.concat is None, c.scale_concat) for c in items}
        if len(kinds) != 1:
            raise ValueError("cannot batch conditionings with and without concat channels")
        concat = None if items[0].concat is None else torch.cat([c.concat for c in items])  # type: ignore[misc]
        loras = None
        if any(c.loras is not None for c in items):
            loras = tuple(a for c in items for a in (c.loras or ((),) * c.rows))
        crossattn = torch.cat([c.crossattn for c in items])
        return Conditioning(
            crossattn, concat=concat, scale_concat=items[0].scale_concat, loras=loras
        )
