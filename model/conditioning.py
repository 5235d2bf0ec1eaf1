"""What the UNet is conditioned on, as one value keyed by kind (the LDM paper's two ways).

`crossattn` is the text context the spatial transformers attend to; `concat` holds spatially
aligned channels appended to the (scaled) latents — the inpainting UNets' mask and masked-image
latents, the paper's concatenation conditioning. Later families add their kinds here (pooled
vectors, class labels, time ids) so that the UNet, the denoise step and the engine carry them
without new parameters. Rows of a batch are concatenated in one place (`cat`).

`loras` is per-row data of another kind: the LoRA adapters (and multipliers) each row's job
uses, kept aligned with the rows by `cat` and `expand` (None: no row uses any).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model.lora_layers import AdapterSet


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of a batch of B rows; every tensor's first dimension is B."""

    crossattn: Tensor  # (B, N, D) text context
    concat: Tensor | None = None  # (B, C_extra, h, w) appended to the UNet input after scaling
    loras: tuple[AdapterSet, ...] | None = None  # (B,) each row's adapters; None: none

    @property
    def rows(self) -> int:
        return self.crossattn.shape[0]

    def expand(self, n: int) -> Conditioning:
        """The same single-row conditioning for n rows (a view, no copy)."""
        return Conditioning(
            crossattn=self.crossattn.expand(n, -1, -1),
            concat=None if self.concat is None else self.concat.expand(n, -1, -1, -1),
            loras=None if self.loras is None else self.loras * n,
        )

    def with_text(self, crossattn: Tensor) -> Conditioning:
        """The same spatial conditioning with another text context (CFG's unconditional row)."""
        return replace(self, crossattn=crossattn)

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        return Conditioning(
            crossattn=self.crossattn.to(device, dtype),
            concat=None if self.concat is None else self.concat.to(device, dtype),
            loras=self.loras,
        )

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Rows of several conditionings as one batch; all must carry the same kinds."""
        kinds = {c.concat is None for c in items}
        if len(kinds) != 1:
            raise ValueError("cannot batch conditionings with and without concat channels")
        concat = None if items[0].concat is None else torch.cat([c.concat for c in items])  # type: ignore[misc]
        loras = None
        if any(c.loras is not None for c in items):
            loras = tuple(a for c in items for a in (c.loras or ((),) * c.rows))
        return Conditioning(
            crossattn=torch.cat([c.crossattn for c in items]), concat=concat, loras=loras
        )
