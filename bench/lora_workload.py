"""A mixed-adapter workload: per-row LoRA in shared engine calls vs one merged set at a time.

Jobs use 0, 1 or 2 of `--adapters` LoRA adapters (kohya files in a temp folder, rank
`--rank`, on kohya's default targets: the spatial transformers' Linear / Conv2d layers), all
submitted at once (a burst), served two ways on the same model in the same run:

(a) today's way: one adapter set at a time, merged into the UNet weights (W += m · α/r ·
    up·down), its jobs as one batch (an `Engine` holding only them), then the merge undone
    and the next set merged; a group per distinct adapter set, in order of first arrival;
(b) `service.engine.Engine` with every job at once, each row with its own adapters
    (unmerged, `model.lora_layers`), adapters resident beforehand (as in (a)).

Printed (medians over `--rounds` runs of each, alternating which goes first, after a
warm-up): wall time, images/s and mean latency (finish time after the burst) of each and the
(b)/(a) ratios; UNet calls; the largest pixel difference between the two images of a job
(merged vs unmerged arithmetic). SD 1.5-shape UNet, random weights, a tiny VAE and a
one-layer 768-wide text tower (so the UNet dominates, as at full size), fp32 CPU.

    .venv/bin/python bench/lora_workload.py                       # 12 jobs, latent 16
    .venv/bin/python bench/lora_workload.py --jobs 16 --latent 32
    .venv/bin/python bench/lora_workload.py --quick               # tiny UNet, seconds
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch
from common import emit_json, load_average, median, set_threads, table
from lora import targets
from safetensors.torch import save_file
from torch import nn

from model.lora_layers import AdapterSet
from model.pipeline import Pipeline
from model.samplers import SD15_SCHEDULER_CONFIG, NoiseSchedule
from model.text import random_text_encoder, tiny_text_config
from model.unet import UNetConfig, UNetModel
from model.vae import TINY_VAE_CONFIG, AutoencoderKL
from service.engine import Engine
from service.engine_types import GenerationRequest

TINY = UNetConfig(
    model_channels=32, channel_mult=(1, 2), attention_levels=(0,), num_res_blocks=1, context_dim=32
)
PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "an old map", "a bowl of cherries")


def build_pipeline(quick: bool) -> Pipeline:
    """SD 1.5-shape UNet (or a tiny one), tiny VAE, one-layer CLIP tower of the context width."""
    cfg = TINY if quick else UNetConfig()  # UNetConfig's defaults are SD 1.5
    torch.manual_seed(0)
    unet = UNetModel(cfg).eval().requires_grad_(False)
    vae = AutoencoderKL(TINY_VAE_CONFIG).eval().requires_grad_(False)
    text = random_text_encoder(tiny_text_config(hidden=cfg.context_dim, layers=1), seed=0)
    return Pipeline(unet, vae, text, NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG), "bench")


def write_adapters(unet: nn.Module, folder: Path, n: int, rank: int) -> list[str]:
    """n kohya files (`lora_unet_<our module name>`), rank `rank`, alpha = rank / 2."""
    names = targets(unet, conv=False)
    for a in range(n):
        gen = torch.Generator().manual_seed(100 + a)
        tensors = {}
        for name in names:
            m = unet.get_submodule(name)
            fan_in, fan_out = (
                (m.in_features, m.out_features) if isinstance(m, nn.Linear) else
                (m.in_channels, m.out_channels)
            )  # fmt: skip
            down = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            up = torch.randn(fan_out, rank, generator=gen) * 0.1 / rank**0.5
            if isinstance(m, nn.Conv2d):  # proj_in / proj_out: 1x1 convolutions at SD 1.5
                down, up = down[:, :, None, None], up[:, :, None, None]
            key = "lora_unet_" + name.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(rank / 2)}  # fmt: skip
        save_file(tensors, str(folder / f"style{a}.safetensors"))
    return [f"style{a}" for a in range(n)]


def make_jobs(
    n: int, adapters: list[str], latent: int, steps: int, seed: int
) -> list[GenerationRequest]:
    """n jobs; job i uses i % 3 adapters (0, 1 or 2, drawn), multiplier 0.8, CFG 7.5."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        names = sorted(rng.sample(adapters, i % 3))
        jobs.append(
            GenerationRequest.of(
                f"job{i:02d}",
                prompt=PROMPTS[i % len(PROMPTS)],
                width=8 * latent,
                height=8 * latent,
                steps=steps,
                sampler="euler",
                seed=1000 + i,
                loras=[{"name": a, "scale": 0.8} for a in names],
            )
        )
    return jobs


def merge(pipe: Pipeline, adapters: AdapterSet, sign: float) -> None:
    """Add (sign 1) or take out (sign -1) an adapter set's updates from the UNet's weights."""
    with torch.no_grad():
        for adapter, scale in adapters:
            for name, w in adapter.weights("unet").items():
                layer = pipe.unet.get_submodule(name)
                delta = w.up.flatten(1) @ w.down.flatten(1)  # (out, in · kh · kw)
                layer.weight.add_(delta.view_as(layer.weight), alpha=sign * scale * w.scale)


def run_merged(
    pipe: Pipeline, jobs: Sequence[GenerationRequest], max_batch: int
) -> tuple[dict[str, float], dict[str, np.ndarray], int, float]:
    """(a): per adapter set, merge, run its jobs as one batch, unmerge. (finish times,
    images, UNet calls, seconds spent merging)"""
    groups: dict[tuple[tuple[str, float], ...], list[GenerationRequest]] = {}
    for job in jobs:
        groups.setdefault(tuple((lo.name, lo.scale) for lo in job.params.loras), []).append(job)
    finish, images, calls, merging = {}, {}, 0, 0.0
    t0 = time.perf_counter()
    for specs, members in groups.items():
        adapters = pipe.adapter_set([{"name": n, "scale": s} for n, s in specs])
        t = time.perf_counter()
        merge(pipe, adapters, 1.0)
        merging += time.perf_counter() - t
        engine = Engine(pipe, max_batch=max_batch)
        plain = [
            GenerationRequest.of(j.id, **j.params.model_dump(exclude={"loras"})) for j in members
        ]
        handles = [engine.submit(j) for j in plain]
        calls += sum(len(o.calls) for o in engine.run_until_idle())
        t = time.perf_counter()
        merge(pipe, adapters, -1.0)
        merging += time.perf_counter() - t
        for h in handles:
            finish[h.id], images[h.id] = time.perf_counter() - t0, np.stack(h.images)
    return finish, images, calls, merging


def run_engine(
    pipe: Pipeline, jobs: Sequence[GenerationRequest], max_batch: int
) -> tuple[dict[str, float], dict[str, np.ndarray], int]:
    """(b): every job in one engine, per-row adapters. (finish times, images, UNet calls)"""
    engine = Engine(pipe, max_batch=max_batch)
    t0 = time.perf_counter()
    handles = [engine.submit(j) for j in jobs]
    finish, calls = {}, 0
    while len(finish) < len(handles):
        out = engine.step()
        calls += len(out.calls)
        for h in out.ended:
            assert h.images, (h.id, h.error)
            finish[h.id] = time.perf_counter() - t0
    return finish, {h.id: np.stack(h.images) for h in handles}, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--latent", type=int, default=16, help="latent side (64 = 512 px)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=24, help="UNet rows per call (2 per job)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each, order alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny UNet, 6 jobs, latent 8, 2 steps")
    args = p.parse_args()
    if args.quick:
        args.jobs, args.latent, args.steps, args.rounds = 6, 8, 2, 1
    threads = set_threads(args.threads)
    print(f"load average at start: {load_average()}")
    pipe = build_pipeline(args.quick)
    with tempfile.TemporaryDirectory() as folder:
        pipe.lora_dir = Path(folder)
        names = write_adapters(pipe.unet, Path(folder), args.adapters, args.rank)
        for name in names:  # resident in both modes: neither pays the file reads
            pipe.loras.load(name)
        jobs = make_jobs(args.jobs, names, args.latent, args.steps, seed=7)
        sets = len({tuple(lo.name for lo in j.params.loras) for j in jobs})
        print(
            f"{args.jobs} jobs over {sets} adapter sets ({args.adapters} rank-{args.rank} "
            f"adapters, 0/1/2 per job), latent {args.latent}, {args.steps} euler steps, CFG, "
            f"max_batch {args.max_batch}, UNet {pipe.unet.config.channel_mult} x"
            f"{pipe.unet.config.model_channels}"
        )
        run_engine(pipe, jobs[1:3], args.max_batch)  # warm-up: one job with, one without
        walls: dict[str, list[float]] = {"a": [], "b": []}
        lats: dict[str, list[float]] = {"a": [], "b": []}
        for r in range(args.rounds):  # alternate which goes first
            for mode in "ab" if r % 2 == 0 else "ba":
                if mode == "a":
                    fin, img_a, calls_a, merging = run_merged(pipe, jobs, args.max_batch)
                else:
                    fin, img_b, calls_b = run_engine(pipe, jobs, args.max_batch)
                walls[mode].append(max(fin.values()))
                lats[mode].append(float(np.mean(list(fin.values()))))
    wall_a, wall_b = median(walls["a"]), median(walls["b"])
    lat_a, lat_b = median(lats["a"]), median(lats["b"])
    diff = max(int(np.abs(img_a[k].astype(int) - img_b[k].astype(int)).max()) for k in img_a)
    rows = [
        ["(a) merged, one set at a time", wall_a, args.jobs / wall_a, lat_a, calls_a],
        ["(b) engine, per-row adapters", wall_b, args.jobs / wall_b, lat_b, calls_b],
    ]
    print(table(["serving", "wall s", "images/s", "mean latency s", "UNet calls"], rows))
    print(
        f"(b)/(a): throughput {wall_a / wall_b:.3f}, mean latency {lat_b / lat_a:.3f}; "
        f"(a) spent {merging:.2f} s merging; max pixel difference (a) vs (b) {diff}/255"
    )
    emit_json(
        "lora_workload",
        {
            "quick": args.quick,
            "threads": threads,
            "jobs": args.jobs,
            "adapter_sets": sets,
            "adapters": args.adapters,
            "rank": args.rank,
            "latent": args.latent,
            "steps": args.steps,
            "max_batch": args.max_batch,
            "rounds": args.rounds,
            "merged_wall_s": wall_a,
            "engine_wall_s": wall_b,
            "merged_mean_latency_s": lat_a,
            "engine_mean_latency_s": lat_b,
            "throughput_ratio": wall_a / wall_b,
            "latency_ratio": lat_b / lat_a,
            "merge_s": merging,
            "merged_calls": calls_a,
            "engine_calls": calls_b,
            "max_pixel_diff": diff,
            "merged_walls_s": walls["a"],
            "engine_walls_s": walls["b"],
        },
    )


if __name__ == "__main__":
    main()
