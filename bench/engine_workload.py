"""The engine benchmark's workload: twin models (identical random weights for diffusers and
ours) and seeded Poisson jobs. See bench/engine.py's docstring for what is measured.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch
from common import DEMO_UNET, SD15_UNET

SAMPLERS = ("euler_a", "ddim", "dpmpp_2m", "euler")
PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "an old map", "a bowl of cherries")

TINY_VAE: dict[str, Any] = {  # f = 8, as SD, but narrow
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
}


@dataclass(frozen=True)
class Job:
    id: str
    arrival: float  # seconds after the start of the run
    prompt: str
    width: int
    height: int
    steps: int
    sampler: str
    guidance: float
    seed: int

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.width, self.height, self.steps, self.sampler, self.guidance)


@dataclass
class Outcome:
    finish: dict[str, float] = field(default_factory=dict)  # job id -> seconds after start
    images: dict[str, np.ndarray] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- model


def build_models(unet: str, folder: Path) -> tuple[Any, Any]:
    """(diffusers pipeline, our Pipeline) with identical random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as DUNet
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel

    from model import load_pipeline
    from model.samplers import SD15_SCHEDULER_CONFIG
    from model.text import bundled_tokenizer, clip_text_config

    torch.manual_seed(0)
    ucfg = SD15_UNET if unet == "sd15" else DEMO_UNET
    hidden = ucfg["cross_attention_dim"]
    text = CLIPTextModel(clip_text_config(hidden=hidden, layers=2))
    ref = StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE),
        text_encoder=text,
        tokenizer=bundled_tokenizer(),
        unet=DUNet(**ucfg),
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref.save_pretrained(folder, safe_serialization=True)
    # As the published SD 1.5 folders: no timestep_spacing, so each sampler uses its
    # diffusers scheduler's own default (save_pretrained would pin DDIM's "leading").
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **SD15_SCHEDULER_CONFIG})
    )
    ref.unet.set_attn_processor(AttnProcessor2_0())
    ref.set_progress_bar_config(disable=True)
    ours = load_pipeline(str(folder), device="cpu", dtype=torch.float32)
    return ref, ours


def diffusers_scheduler(name: str) -> Any:
    import diffusers

    from model.samplers import SD15_SCHEDULER_CONFIG

    cls = {
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler,
        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    }[name]
    return cls.from_config(SD15_SCHEDULER_CONFIG)


# ---------------------------------------------------------------- workload


def make_jobs(
    n: int, rate: float, latent: int, steps: list[int], seed: int, uniform: bool
) -> list[Job]:
    """n jobs, Poisson arrivals at `rate`/s, two sizes, mixed steps and samplers (seeded)."""
    rng = random.Random(seed)
    sizes = [(8 * latent, 8 * latent), (12 * latent, 8 * latent)]
    t, jobs = 0.0, []
    for i in range(n):
        jobs.append(
            Job(
                id=f"job{i:03d}",
                arrival=t,
                prompt=rng.choice(PROMPTS),
                width=sizes[0][0] if uniform else rng.choice(sizes)[0],
                height=8 * latent,
                steps=steps[len(steps) // 2] if uniform else rng.choice(steps),
                sampler=SAMPLERS[0] if uniform else rng.choice(SAMPLERS),
                guidance=7.5,
                seed=1000 + i,
            )
        )
        t += rng.expovariate(rate)
    return jobs


def make_group_jobs(
    n: int, latent: int, steps: list[int], sampler: str, rate: float | None, seed: int
) -> list[Job]:
    """n jobs in len(steps) settings groups (one size and sampler, CFG 7.5; group g runs
    steps[g]), interleaved in arrival order, with different prompts and seeds: a workload in
    which static batching has real groups. rate None: all arrive at once; else Poisson."""
    rng = random.Random(seed)
    t, jobs = 0.0, []
    for i in range(n):
        jobs.append(
            Job(
                id=f"job{i:03d}",
                arrival=t,
                prompt=f"{PROMPTS[i % len(PROMPTS)]}, variation {i}",
                width=8 * latent,
                height=8 * latent,
                steps=steps[i % len(steps)],
                sampler=sampler,
                guidance=7.5,
                seed=1000 + i,
            )
        )
        if rate is not None:
            t += rng.expovariate(rate)
    return jobs


def sleep_until(t0: float, offset: float) -> None:
    delay = t0 + offset - time.monotonic()
    if delay > 0:
        time.sleep(delay)
