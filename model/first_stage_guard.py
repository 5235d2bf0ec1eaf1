"""The first stage, never handing back NaN or inf: a half-precision autoencoder that overflows
(SDXL's does in fp16 where its checkpoint does not ask for float32) runs the call again on a
float32 copy of itself, made on first need; non-finite in float32 too raises
NonFiniteDecodeError, so a broken image is never returned as a result (the engine fails the
job instead). Encoding and decoding both go through it; outputs are float32.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from model.first_stage import FirstStage, Posterior

log = logging.getLogger(__name__)

T = TypeVar("T")


class NonFiniteDecodeError(RuntimeError):
    """The VAE gave NaN or inf even in float32: such an image is never returned."""


def dtype_of(module: FirstStage) -> torch.dtype:
    """The dtype a first stage computes in (its parameters')."""
    return next(module.parameters()).dtype  # type: ignore[attr-defined]


def _finite_tensor(out: torch.Tensor) -> bool:
    return bool(torch.isfinite(out).all())


def _finite_posterior(post: Posterior) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in post)  # type: ignore[attr-defined]


class FiniteFirstStage:
    """Runs a pipeline's first stage (passed per call: the pipeline owns it) with the float32
    retry; keeps the float32 copy of the half-precision module it was made from."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._fp32: tuple[FirstStage, FirstStage] | None = None  # (the original, its copy)

    def float32(self, vae: FirstStage) -> FirstStage:
        """`vae` in float32 (itself when it already is): a copy, made once per module."""
        if dtype_of(vae) == torch.float32:
            return vae
        if self._fp32 is None or self._fp32[0] is not vae:
            self._fp32 = (vae, copy.deepcopy(vae).float())  # type: ignore[attr-defined]
        return self._fp32[1]

    def encode(self, vae: FirstStage, pixels: torch.Tensor) -> Posterior:
        """The posterior of pixels in [-1, 1] on the module's device, in float32 (unscaled)."""
        return self._run(vae, lambda m: m.encode(pixels.to(dtype_of(m))).float(),
                         _finite_posterior, "encoding")  # fmt: skip

    def decode(
        self, vae: FirstStage, z: torch.Tensor, scale: float, tile: int | None
    ) -> torch.Tensor:
        """Pixels (b, 3, H, W) in [-1, 1], float32, of latents `z` (divided by `scale` in the
        module's dtype, as diffusers unscales them)."""
        return self._run(vae, lambda m: m.decode(z.to(dtype_of(m)) / scale, tile=tile).float(),
                         _finite_tensor, "decoding")  # fmt: skip

    def _run(
        self, vae: FirstStage, call: Callable[[FirstStage], T], finite: Callable[[T], bool],
        what: str,
    ) -> T:  # fmt: skip
        out = call(vae)
        if finite(out):
            return out
        if dtype_of(vae) != torch.float32:
            log.warning("%s: VAE %s gave non-finite values in %s; retrying in float32",
                        self.name, what, dtype_of(vae))  # fmt: skip
            out = call(self.float32(vae))
            if finite(out):
                return out
        raise NonFiniteDecodeError(
            f"the VAE {what} gave non-finite values (NaN or inf), in float32 too: "
            "the weights or the input are broken"
        )
