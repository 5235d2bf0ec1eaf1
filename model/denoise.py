"""One batched denoising step, shared by `Pipeline.generate()` and the serving engine.

Every row is one image with its own trajectory, state, conditioning and guidance scale; the
step builds the UNet input (sampler input scaling, then concat channels inside the UNet),
makes one UNet call with classifier-free guidance batched (the conditional rows of all rows,
then the unconditional rows of the guided ones), combines the guided outputs, applies each
row's sampler update and, for 4-channel inpainting, the blend that keeps the unmasked area on
the noised source's trajectory (diffusers' StableDiffusionInpaintPipeline blend path).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from model import samplers
from model.conditioning import Conditioning
from model.host_threads import one_cpu_thread
from model.samplers import SampleState, Trajectory

UNetFn = Callable[[Tensor, Tensor, Conditioning], Tensor]  # (x, t, cond) -> float32 output


@dataclass(frozen=True)
class Blend:
    """Inpainting on an ordinary UNet: where `mask` is 0 the latents follow the source."""

    mask: Tensor  # (1, 1, h, w) 1 = repaint, 0 = keep
    clean: Tensor  # (1, C, h, w) the source image's latents
    noise: Tensor  # (1, C, h, w) the noise the trajectory started from


@dataclass
class Row:
    """One image being denoised."""

    traj: Trajectory
    state: SampleState
    cond: Conditioning  # one row
    uncond: Conditioning | None  # None: unguided (guidance scale <= 1, as diffusers)
    guidance: float
    blend: Blend | None = None

    @property
    def rows(self) -> int:
        """UNet rows this image takes per call: CFG doubles it."""
        return 1 if self.uncond is None else 2

    @property
    def finished(self) -> bool:
        return self.state.k >= self.traj.n_evals


class ConditioningCache:
    """The batched conditioning of the last few calls, keyed by the rows' own conditioning
    objects: a call whose rows are the same as at the previous step (the steady state of a
    batch) reuses it instead of copying every row's text context again (at SD 1.5, 32 CFG
    rows are 15 MB per step)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[tuple[int, ...], tuple[list[Conditioning], Conditioning]]
        self._items = OrderedDict()

    def cat(self, items: list[Conditioning]) -> Conditioning:
        key = tuple(map(id, items))  # the entry holds the items: their ids stay theirs
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit[1]
        value = Conditioning.cat(items)
        self._items[key] = (items, value)
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


def denoise_step(
    unet: UNetFn, rows: Sequence[Row], cache: ConditioningCache | None = None
) -> list[SampleState]:
    """One UNet evaluation for every row; returns the new states (inputs are not mutated).

    Rows are taken in the order of their sampler's update rule (rows never mix, so the order
    is free), so that each rule's rows are one slice of the batch and the next step joins
    them without copies (`samplers.joined`); see `samplers.row_order`."""
    order = sorted(range(len(rows)), key=lambda i: samplers.row_order(rows[i].traj.sampler))
    if order != list(range(len(rows))):
        new = _step(unet, [rows[i] for i in order], cache)
        result: list[SampleState] = [None] * len(rows)  # type: ignore[list-item]
        for pos, i in enumerate(order):
            result[i] = new[pos]
        return result
    return _step(unet, rows, cache)


def _step(unet: UNetFn, rows: Sequence[Row], cache: ConditioningCache | None) -> list[SampleState]:
    trajs, states = [r.traj for r in rows], [r.state for r in rows]
    n = len(rows)
    guided = [i for i, r in enumerate(rows) if r.uncond is not None]
    with one_cpu_thread(states[0].x.device):
        x_in, t = samplers.model_input(trajs, states)  # (n, C, h, w), (n,)
        conds = [r.cond for r in rows] + [rows[i].uncond for i in guided]
        cond = Conditioning.cat(conds) if cache is None else cache.cat(conds)  # type: ignore[arg-type]
        if guided:
            idx = torch.tensor(guided, device=x_in.device)
            x_in, t = torch.cat([x_in, x_in[idx]]), torch.cat([t, t[idx]])  # (n + g, ...)
        if cond.scale_concat and cond.concat is not None:  # as the latents: x / in_scale
            scale = [r.traj.in_scale[r.state.k] for r in rows]
            scale = torch.tensor(scale + [scale[i] for i in guided], device=x_in.device)
            concat = cond.concat / scale.view(-1, 1, 1, 1).to(cond.concat.dtype)
            cond = replace(cond, concat=concat)
    out = unet(x_in, t, cond)  # (n + g, C, h, w) float32
    with one_cpu_thread(out.device):
        model_out = out[:n]
        if guided:
            idx = idx.to(out.device)
            weights = [rows[i].guidance for i in guided]
            scale = torch.tensor(weights, dtype=out.dtype, device=out.device).view(-1, 1, 1, 1)
            out_cond, out_uncond = model_out[idx], out[n:]
            guided_out = torch.addcmul(out_uncond, scale, out_cond - out_uncond)
            model_out = model_out.index_copy(0, idx, guided_out)
        new = samplers.advance(trajs, states, model_out)
        for row, state in zip(rows, new, strict=True):
            if row.blend is not None:
                b = row.blend
                target = samplers.renoise(row.traj, state.k, b.clean, b.noise)
                state.x = (1 - b.mask) * target + b.mask * state.x
    return new
