"""Batched, unmerged LoRA: every row of a call gets its own adapters' low-rank updates.

The targeted nn.Linear / nn.Conv2d modules of a network are switched in place to a subclass
(same parameters, same state-dict keys, so loaders and converters see nothing new) whose
forward adds, after the base layer, for each adapter present in the current call,
`scale_row * alpha / rank * up(down(x[rows]))` into the rows that use it (gather, two small
matmuls or convolutions, `index_add`). The weights are never merged and there is no loop over
rows: the loop is over the adapters of the call, as Punica / S-LoRA group rows by adapter.

Which rows use which adapter reaches the layers through the network's `LoraSlot`, set for
the duration of one call (`applied`); with no adapters in the call a layer costs one check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.lora_files import LoraFile, LoraWeight

AdapterSet = tuple[tuple[LoraFile, float], ...]  # one row's adapters and their multipliers


@dataclass(frozen=True)
class RowGroup:
    """The rows of a call that use one adapter, each with its multiplier."""

    adapter: LoraFile
    rows: Tensor | None  # (n,) int64 row indices; None: every row of the call
    scales: Tensor  # (n,) multipliers, float32 ((1,) for every row)


class LoraSlot:
    """The adapter groups of the call in progress, read by every adapted layer of one network."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.groups: tuple[RowGroup, ...] = ()


class _Adapted:
    """What LoraLinear / LoraConv2d share: the slot, the layer's name, the grouped update."""

    lora_slot: LoraSlot
    lora_name: str

    def _delta(
        self, x: Tensor, out: Tensor, low_rank: Callable[[Tensor, LoraWeight], Tensor]
    ) -> Tensor:
        """out + each adapter's scaled low_rank(x[rows]) on its rows."""
        for group in self.lora_slot.groups:
            w = group.adapter.weights(self.lora_slot.part).get(self.lora_name)
            if w is None:
                continue
            rows = group.rows
            h = low_rank(x if rows is None else x.index_select(0, rows), w)  # like out[rows]
            scale = (group.scales * w.scale).to(out.dtype).view(-1, *([1] * (out.ndim - 1)))
            if rows is None:
                out.add_(h * scale)  # out is this layer's own fresh output
            else:
                out.index_add_(0, rows, h * scale)
        return out


class LoraLinear(nn.Linear, _Adapted):
    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return self._delta(x, out, self._low_rank) if self.lora_slot.groups else out

    @staticmethod
    def _low_rank(x: Tensor, w: LoraWeight) -> Tensor:
        return F.linear(F.linear(x, w.down), w.up)  # (n, ..., r) -> (n, ..., out)


class LoraConv2d(nn.Conv2d, _Adapted):
    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return self._delta(x, out, self._low_rank) if self.lora_slot.groups else out

    def _low_rank(self, x: Tensor, w: LoraWeight) -> Tensor:
        """down with the layer's kernel size, stride, padding and dilation (LoCon), 1x1 up."""
        h = F.conv2d(x, w.down, stride=self.stride, padding=self.padding, dilation=self.dilation)
        return F.conv2d(h, w.up)  # (n, out, H', W')


def install(root: nn.Module, names: Sequence[str], slot: LoraSlot) -> None:
    """Make the named layers of `root` adaptable (idempotent; parameters untouched)."""
    for name in names:
        layer = root.get_submodule(name)
        if isinstance(layer, _Adapted):
            continue
        cls = LoraConv2d if isinstance(layer, nn.Conv2d) else LoraLinear
        if type(layer) not in (nn.Linear, nn.Conv2d):
            raise TypeError(f"{name}: cannot adapt a {type(layer).__name__}")
        layer.__class__ = cls
        layer.lora_slot = slot  # type: ignore[union-attr]
        layer.lora_name = name  # type: ignore[union-attr]


def row_groups(
    per_row: Sequence[AdapterSet], part: str, device: torch.device
) -> tuple[RowGroup, ...]:
    """Rows grouped by adapter (adapters with nothing for `part` are left out)."""
    rows: dict[int, tuple[LoraFile, list[int], list[float]]] = {}
    for i, adapters in enumerate(per_row):
        for adapter, scale in adapters:
            if not adapter.weights(part):
                continue
            entry = rows.setdefault(id(adapter), (adapter, [], []))
            entry[1].append(i)
            entry[2].append(float(scale))
    return tuple(
        RowGroup(
            adapter,
            torch.tensor(idx, dtype=torch.long, device=device),
            torch.tensor(scales, dtype=torch.float32, device=device),
        )
        for adapter, idx, scales in rows.values()
    )


def every_row(adapters: AdapterSet, part: str, device: torch.device) -> tuple[RowGroup, ...]:
    """One adapter set for every row of a call, however many (a text encoder's chunks)."""
    scales: dict[int, tuple[LoraFile, float]] = {}
    for adapter, scale in adapters:  # a file named twice: its multipliers add up
        if adapter.weights(part):
            scales[id(adapter)] = (adapter, scales.get(id(adapter), (adapter, 0.0))[1] + scale)
    return tuple(
        RowGroup(adapter, None, torch.tensor([scale], dtype=torch.float32, device=device))
        for adapter, scale in scales.values()
    )


@contextmanager
def applied(
    slot: LoraSlot,
    per_row: Sequence[AdapterSet] | None,
    device: torch.device,
    *,
    every: AdapterSet = (),
) -> Iterator[None]:
    """The rows' adapters (or `every` row's) active in the slot's network for one call."""
    if every:
        slot.groups = every_row(every, slot.part, device)
    else:
        slot.groups = row_groups(per_row, slot.part, device) if per_row else ()
    try:
        yield
    finally:
        slot.groups = ()
