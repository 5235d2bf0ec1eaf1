"""What the UNet is conditioned on, as one value keyed by kind (the LDM paper's two ways).

`crossattn` is the text context the spatial transformers attend to; `concat` holds spatially
aligned channels appended to the (scaled) latents — the inpainting UNets' mask and masked-image
latents, the paper's concatenation conditioning; with `scale_concat` they go through the
sampler's input scaling with the latents, as diffusers' LDMSuperResolutionPipeline scales its
low-res image. A model without text conditioning gets an empty (B, 0, 0) `crossattn`. The
added embedding's inputs ride along per row: SDXL's pooled text vector and micro-conditioning
time ids, or class labels (the x4 upscaler's noise level). So the UNet, the denoise step and
the engine carry every kind without new parameters; rows of a batch are concatenated in one
place (`cat`).

`loras` is per-row data of another kind: the LoRA adapters (and multipliers) each row's job
uses, kept aligned with the rows by every row operation (None: no row uses any). Rows with
different adapters batch together; it is not a kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model.lora_layers import AdapterSet

_OPTIONAL = ("concat", "pooled", "time_ids", "class_labels")


def pad_rows(t: Tensor, n: int) -> Tensor:
    """``t``'s rows followed by copies of its last row, ``n`` rows in all."""
    extra = n - t.shape[0]
    return t if extra <= 0 else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of a batch of B rows; every tensor's first dimension is B."""

    crossattn: Tensor  # (B, N, D) text context
    concat: Tensor | None = None  # (B, C_extra, h, w) appended to the UNet input after scaling
    pooled: Tensor | None = None  # (B, P) pooled text embedding (SDXL's text_embeds)
    time_ids: Tensor | None = None  # (B, K) micro-conditioning (SDXL: sizes, crop, aesthetics)
    class_labels: Tensor | None = None  # (B,) or (B, P): what a class embedding embeds
    scale_concat: bool = False  # concat is input-scaled with the latents (LDM super-resolution)
    loras: tuple[AdapterSet, ...] | None = None  # (B,) each row's adapters; None: none

    @property
    def rows(self) -> int:
        return self.crossattn.shape[0]

    @property
    def kinds(self) -> tuple[str, ...]:
        """The optional kinds this value carries (rows batch together only with equal kinds)."""
        kinds = tuple(k for k in _OPTIONAL if getattr(self, k) is not None)
        return (*kinds, "scale_concat") if self.scale_concat else kinds

    def _with_loras(self, value: Conditioning, pick: Callable[[tuple], tuple]) -> Conditioning:
        return value if self.loras is None else replace(value, loras=pick(self.loras))

    def expand(self, n: int) -> Conditioning:
        """The same single-row conditioning for n rows (a view, no copy)."""
        out = self.map_rows(lambda v: v.expand(n, *v.shape[1:]))
        return self._with_loras(out, lambda a: a * n)

    def split(self) -> list[Conditioning]:
        """One single-row conditioning per row (views, no copy)."""
        return [self.rows_slice(i, i + 1) for i in range(self.rows)]

    def with_text(
        self, crossattn: Tensor, pooled: Tensor | None = None, time_ids: Tensor | None = None
    ) -> Conditioning:
        """The same spatial conditioning with another text (CFG's unconditional row): its own
        context and, where given, its own pooled vector and time ids; the same adapters."""
        return replace(
            self,
            crossattn=crossattn,
            pooled=self.pooled if pooled is None else pooled,
            time_ids=self.time_ids if time_ids is None else time_ids,
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        """On `device`; floating tensors in `dtype` (integer class labels stay integers)."""
        return self.map_rows(
            lambda v: v.to(device, dtype) if v.is_floating_point() else v.to(device)
        )

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """Apply ``fn`` to every per-row tensor (each kind has rows first)."""
        changes = {
            f.name: fn(v) for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)
        }
        return replace(self, **changes)

    def pad_rows(self, n: int) -> Conditioning:
        """These rows, then copies of the last one, ``n`` in all (bucketed compiled calls)."""
        out = self.map_rows(lambda t: pad_rows(t, n))
        return self._with_loras(out, lambda a: a + a[-1:] * max(0, n - len(a)))

    def rows_slice(self, start: int, stop: int) -> Conditioning:
        out = self.map_rows(lambda t: t[start:stop])
        return self._with_loras(out, lambda a: a[start:stop])

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Rows of several conditionings as one batch; all must carry the same kinds."""
        kinds = {c.kinds for c in items}
        if len(kinds) != 1:
            raise ValueError(f"cannot batch conditionings of different kinds: {sorted(kinds)}")
        tensors = {
            f.name: None
            if getattr(items[0], f.name) is None
            else torch.cat([getattr(c, f.name) for c in items])
            for f in fields(Conditioning)
            if f.name not in ("scale_concat", "loras")
        }
        loras = None
        if any(c.loras is not None for c in items):
            loras = tuple(a for c in items for a in (c.loras or ((),) * c.rows))
        return Conditioning(**tensors, scale_concat=items[0].scale_concat, loras=loras)
