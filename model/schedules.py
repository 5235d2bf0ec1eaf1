"""Noise schedules and timestep/sigma grids, following the conventions of diffusers' schedulers.

Every grid is computed with the same float32/float64 steps as the scheduler it mirrors, so the
timesteps handed to the UNet are bit-identical and the sigmas agree to the last float32 bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}

# SDXL's published scheduler_config.json: SD 1.5's schedule with "leading" spacing, which
# single files (no scheduler config of their own) get, as diffusers' from_single_file does.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "leading"}

PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")
_UNSUPPORTED_FLAGS = ("clip_sample", "thresholding", "rescale_betas_zero_snr")


def _betas(cfg: Mapping[str, Any], n: int) -> torch.Tensor:
    """Training betas (float32, as diffusers builds them); missing keys take SD 1.5's values."""
    if cfg.get("trained_betas") is not None:
        return torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    kind = cfg.get("beta_schedule", "scaled_linear")
    b0 = float(cfg.get("beta_start", SD15_SCHEDULER_CONFIG["beta_start"]))
    b1 = float(cfg.get("beta_end", SD15_SCHEDULER_CONFIG["beta_end"]))
    if kind == "linear":
        return torch.linspace(b0, b1, n, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2

    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, cosine alpha-bar

        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"unsupported beta_schedule {kind!r}; use scaled_linear, linear or squaredcos_cap_v2"
    )


@dataclass(frozen=True)
class NoiseSchedule:
    """A trained DDPM noise schedule plus the sampling options a scheduler config carries.

    `timestep_spacing` and `set_alpha_to_one` stay None when the config does not set them, so
    each sampler applies its own diffusers default (as `Scheduler.from_config` would).
    """

    alphas_cumprod: tuple[float, ...] = field(repr=False)  # (T,) float32 values
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    timestep_spacing: str | None = None
    set_alpha_to_one: bool | None = None
    original_inference_steps: int = 50  # LCM: length of the distillation timestep grid
    timestep_scaling: float = 10.0  # LCM: boundary-condition time scale

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> NoiseSchedule:
        """Build from a diffusers scheduler_config.json dict (unknown keys ignored); None → SD 1.5."""
        cfg = SD15_SCHEDULER_CONFIG if cfg is None else cfg
        n = int(cfg.get("num_train_timesteps", 1000))
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {pred!r}; use one of {PREDICTION_TYPES}")
        spacing = cfg.get("timestep_spacing")
        if spacing is not None and spacing not in SPACINGS:
            raise ValueError(f"unsupported timestep_spacing {spacing!r}; use one of {SPACINGS}")
        for flag in _UNSUPPORTED_FLAGS:
            if cfg.get(flag):
                log.warning("scheduler config sets %s=true; ldmserve samplers ignore it", flag)
        alphas_cumprod = torch.cumprod(1.0 - _betas(cfg, n), dim=0)
        one = cfg.get("set_alpha_to_one")
        return cls(
            alphas_cumprod=tuple(alphas_cumprod.tolist()),
            prediction_type=pred,
            steps_offset=int(cfg.get("steps_offset", 0)),
            timestep_spacing=spacing,
            set_alpha_to_one=None if one is None else bool(one),
            original_inference_steps=int(cfg.get("original_inference_steps", 50)),
            timestep_scaling=float(cfg.get("timestep_scaling", 10.0)),
        )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    @cached_property
    def sigmas(self) -> np.ndarray:
        """(T,) float32 Karras-style sigmas sqrt((1 - ᾱ) / ᾱ) per training timestep."""
        ac = torch.tensor(self.alphas_cumprod, dtype=torch.float32)
        return (((1 - ac) / ac) ** 0.5).numpy()

    def spacing(self, default: str) -> str:
        """The config's timestep spacing, else the sampler's own default."""
        return self.timestep_spacing or default

    def final_alpha(self, default_one: bool) -> float:
        """ᾱ used past the last timestep: 1, or ᾱ_0 (`set_alpha_to_one`, default per sampler)."""
        one = default_one if self.set_alpha_to_one is None else self.set_alpha_to_one
        return 1.0 if one else self.alphas_cumprod[0]

    def alpha_at(self, t: int, default_one: bool) -> float:
        """ᾱ_t, with negative t meaning "after the last step"."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha(default_one)


def spaced_timesteps(
    spacing: str, n: int, t_train: int, offset: int, *, integer: bool
) -> np.ndarray:
    """n descending timesteps by the linspace/leading/trailing rule (Lin et al. 2023, Table 2).

    `integer` selects DDIM/PNDM-style int64 grids (linspace rounded) over the float32 grids of
    the Euler/Heun family (linspace not rounded).
    """
    if spacing == "linspace":
        ts = np.linspace(0, t_train - 1, n, dtype=np.float64 if integer else np.float32)
        ts = (ts.round() if integer else ts)[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (t_train // n)).round()[::-1] + offset
    elif spacing == "trailing":
        ts = np.arange(t_train, 0, -t_train / n).round() - 1
    else:
        raise ValueError(f"unsupported timestep_spacing {spacing!r}")
    return ts.astype(np.int64 if integer else np.float32)


def dpm_timesteps(spacing: str, n: int, t_train: int, offset: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's grid: n + 1 points, the final (t = 0 side) one dropped."""
    if spacing == "linspace":
        ts = np.linspace(0, t_train - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (t_train // (n + 1))).round()[::-1][:-1] + offset
    elif spacing == "trailing":
        ts = np.arange(t_train, 0, -t_train / n).round() - 1
    else:
        raise ValueError(f"unsupported timestep_spacing {spacing!r}")
    return ts.astype(np.int64)


def interp_sigmas(schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps, linearly interpolated (float64)."""
    sig = schedule.sigmas
    return np.interp(timesteps, np.arange(0, len(sig)), sig)


def karras_sigmas(schedule: NoiseSchedule, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas spaced uniformly in sigma^(1/rho) (Karras et al. 2022, eq. 5), descending."""
    lo, hi = float(schedule.sigmas[0]) ** (1 / rho), float(schedule.sigmas[-1]) ** (1 / rho)
    ramp = np.linspace(0, 1, n)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(schedule: NoiseSchedule, sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps whose log-sigma interpolates to `sigmas` (inverse of interp_sigmas)."""
    log_table = np.log(schedule.sigmas)  # (T,) float32, increasing
    log_sig = np.log(np.maximum(sigmas, 1e-10))
    lo = np.clip(np.searchsorted(log_table, log_sig, side="right") - 1, 0, len(log_table) - 2)
    w = np.clip((log_table[lo] - log_sig) / (log_table[lo] - log_table[lo + 1]), 0, 1)
    return (1 - w) * lo + w * (lo + 1)


def ve_grid(sched: NoiseSchedule, steps: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Euler/Heun float32 timesteps, float32 sigmas with a trailing 0, initial noise sigma."""
    spacing = sched.spacing("linspace")
    n, offset = sched.num_train_timesteps, sched.steps_offset
    ts = spaced_timesteps(spacing, steps, n, offset, integer=False)
    sig = np.concatenate([interp_sigmas(sched, ts), [0.0]]).astype(np.float32)
    top = float(sig[0])
    init = top if spacing in ("linspace", "trailing") else (top * top + 1) ** 0.5
    return ts, sig, float(np.float32(init))


def dpm_grid(sched: NoiseSchedule, steps: int, karras: bool) -> tuple[np.ndarray, list[float]]:
    """DPM-Solver int timesteps and float32 sigmas (trailing 0), optionally Karras-spaced."""
    if karras:
        sig = karras_sigmas(sched, steps)
        ts = sigma_to_t(sched, sig).round().astype(np.int64)
    else:
        n, offset = sched.num_train_timesteps, sched.steps_offset
        ts = dpm_timesteps(sched.spacing("linspace"), steps, n, offset)
        sig = interp_sigmas(sched, ts)
    return ts, np.concatenate([sig, [0.0]]).astype(np.float32).tolist()
