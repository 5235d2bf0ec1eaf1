"""`Pipeline.generate()` against diffusers' StableDiffusionPipeline, same weights, same job.

SD 1.5 shapes with random weights (UNet ~860M, SD VAE, CLIP ViT-L text tower; bench/gpu.py's
`build`, ours sharing diffusers' tensors), fp32 on CPU, one job: 256x256, 3 DDIM steps, CFG
7.5, decoded to uint8 by both. Two layouts, each timed in interleaved rounds (A B B A ...):

- default: each side as it runs when loaded (ours: channels_last on CPU, see
  model.unet.prefers_channels_last; diffusers: NCHW);
- channels_last: both with channels_last weights (diffusers' UNet and VAE converted);
- compiled (`--compile`): ours with `compile_unet((2,))` warmed at the job's size (inductor
  with freezing, what a worker with compile_unet=true does; compile time
  printed, not timed), diffusers as loaded.

Reported per layout: medians, ours/diffusers of the medians and the median of per-round
ratios (goal <= 0.90 for the default layout), and the max pixel difference of the images.

    .venv/bin/python bench/generate.py              # SD 1.5 shape (minutes on 2 cores)
    .venv/bin/python bench/generate.py --quick      # tiny model, seconds (smoke test)
"""

from __future__ import annotations

import argparse
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch
from common import emit_json, interleaved, load_average, median, set_threads, table
from gpu import build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny model, 64x64, 2 repeats")
    p.add_argument("--compile", action="store_true", help="also ours with the UNet compiled "
                   "(inductor, as a worker with compile_unet=true) vs diffusers as loaded")  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.size, args.repeats = 64, 2
    threads = set_threads(args.threads)
    print(f"load average at start: {load_average()}")
    from diffusers import DDIMScheduler

    from model.samplers import SD15_SCHEDULER_CONFIG

    ref, ours = build(args.quick, torch.device("cpu"), torch.float32)
    ref.scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    job = {"width": args.size, "height": args.size, "steps": args.steps, "seed": 3}

    def run_ours() -> np.ndarray:
        return np.asarray(ours.generate("a lighthouse at dusk", sampler="ddim", **job)[0])

    def run_ref() -> np.ndarray:
        with torch.inference_mode():
            out = ref(
                "a lighthouse at dusk", num_inference_steps=args.steps, guidance_scale=7.5,
                width=args.size, height=args.size, output_type="np",
                generator=torch.Generator("cpu").manual_seed(3),
            ).images[0]  # fmt: skip
        return (out * 255).round().astype(np.uint8)

    rows, results = [], []
    layouts = ["default", "channels_last"] + (["compiled"] if args.compile else [])
    for layout in layouts:
        if layout == "channels_last":
            for m in (ref.unet, ref.vae, ours.vae):
                m.to(memory_format=torch.channels_last)
            if not ours.unet.channels_last:
                ours.unet.use_channels_last()
        if layout == "compiled":  # diffusers back as loaded; ours compiled
            for m in (ref.unet, ref.vae):
                m.to(memory_format=torch.contiguous_format)
            ours.compile_unet((2,))  # one image with CFG: 2 rows
            took = ours.warm_compiled(args.size, args.size)
            print(f"compiled: UNet compiled in {took:.1f}s (not timed below)", flush=True)
        diff = int(np.abs(run_ours().astype(int) - run_ref().astype(int)).max())
        times = interleaved({"ours": run_ours, "diffusers": run_ref}, args.repeats, warmup=1)
        m_ours, m_ref = median(times["ours"]), median(times["diffusers"])
        per_round = median([a / b for a, b in zip(times["ours"], times["diffusers"], strict=True)])
        print(f"{layout}: ours {m_ours:.2f}s diffusers {m_ref:.2f}s ratio {m_ours / m_ref:.3f} "
              f"(per-round {per_round:.3f}), max pixel diff {diff}", flush=True)  # fmt: skip
        rows.append([layout, m_ours, m_ref, m_ours / m_ref, per_round, diff])
        results.append({"layout": layout, "ours_s": m_ours, "diffusers_s": m_ref,
                        "ratio": m_ours / m_ref, "per_round_ratio": per_round,
                        "max_pixel_diff": diff, "ours_all_s": times["ours"],
                        "diffusers_all_s": times["diffusers"]})  # fmt: skip
    print(table(["layout", "ours s", "diffusers s", "ours/diffusers", "per-round", "max px"],
                rows))  # fmt: skip
    print("goal: ours/diffusers <= 0.90 in the default layout (eager: the default everywhere)")
    meta: dict[str, Any] = {"threads": threads, "quick": args.quick, "size": args.size,
                            "steps": args.steps, "results": results}  # fmt: skip
    print(f"load average at end: {load_average()}")
    emit_json("generate", meta)


if __name__ == "__main__":
    main()
