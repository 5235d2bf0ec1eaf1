"""One reproducible workload served three ways on the same weights, in one process.

(a) serial: one job at a time through diffusers' StableDiffusionPipeline (scheduler switched
    per job to the diffusers class our sampler reproduces).
(b) static: a dynamic batcher as Triton/SGLang-style servers do it, on our Pipeline: take the
    oldest waiting job, wait until `--static-batch` waiting jobs share its exact settings
    (size, steps, sampler, guidance) or `--static-window` s have passed since it arrived,
    then run that group (no padding) to the end together.
(c) engine: service.engine.Engine (step-level continuous batching), jobs submitted at their
    arrival times.

Arrivals are Poisson (fixed seed), replayed in real time for all three; a job's latency is
finish - arrival, throughput = images / (last finish - first arrival). The arrival rate is
`--load` times the rate one-at-a-time serving (a) can sustain, measured in a calibration run,
so the system is loaded. Weights: a tiny diffusers pipeline (demo-sized, or with the SD 1.5
UNet via `--unet sd15`) is built with random weights, saved with save_pretrained and loaded by
model.load_pipeline, so both implementations run identical weights; the max pixel difference
between (a)'s and (c)'s images for the same jobs is printed as a check.

    .venv/bin/python bench/engine.py                          # demo-sized model, 32 jobs
    .venv/bin/python bench/engine.py --unet sd15 --latent 16  # SD 1.5 UNet, 8 jobs
    .venv/bin/python bench/engine.py --quick                  # smoke test, seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch
from common import EngineDriver, emit_json, load_average, set_threads, table
from engine_workload import (
    Job,
    Outcome,
    build_models,
    diffusers_scheduler,
    make_jobs,
    sleep_until,
)

# ---------------------------------------------------------------- (a) serial diffusers


def run_diffusers_job(ref: Any, job: Job) -> np.ndarray:
    ref.scheduler = diffusers_scheduler(job.sampler)
    with torch.inference_mode():
        out = ref(
            job.prompt,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            width=job.width,
            height=job.height,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="np",
        ).images
    return (out[0] * 255).round().astype(np.uint8)


def serve_serial(ref: Any, jobs: list[Job]) -> Outcome:
    res = Outcome()
    t0 = time.monotonic()
    for job in jobs:
        sleep_until(t0, job.arrival)
        res.images[job.id] = run_diffusers_job(ref, job)
        res.finish[job.id] = time.monotonic() - t0
        res.batches.append(1)
    return res


# ---------------------------------------------------------------- (b) static batching


def run_static_batch(pipe: Any, batch: list[Job]) -> np.ndarray:
    """One group of identical settings, run to the end together (our Pipeline pieces)."""
    from model.denoise import denoise_step

    head = batch[0]
    cond = pipe.encode_prompts([j.prompt for j in batch]).split()
    uncond = pipe.encode_prompts([""])
    rows = [
        row
        for i, j in enumerate(batch)
        for row in pipe.begin(
            cond[i], uncond, width=head.width, height=head.height, steps=head.steps,
            guidance_scale=j.guidance, sampler=head.sampler, seed=j.seed, num_images=1,
        ).rows
    ]  # fmt: skip
    while not rows[0].finished:
        for row, state in zip(rows, denoise_step(pipe.unet_forward, rows), strict=True):
            row.state = state
    return pipe.decode_latents(torch.cat([r.state.x for r in rows]))


def serve_static(pipe: Any, jobs: list[Job], max_images: int, window: float) -> Outcome:
    res = Outcome()
    t0 = time.monotonic()
    waiting: list[Job] = []
    upcoming = list(jobs)
    while waiting or upcoming:
        now = time.monotonic() - t0
        while upcoming and upcoming[0].arrival <= now:
            waiting.append(upcoming.pop(0))
        if not waiting:
            sleep_until(t0, upcoming[0].arrival)
            continue
        head = waiting[0]
        group = [j for j in waiting if j.key == head.key][:max_images]
        deadline = head.arrival + window
        if len(group) < max_images and now < deadline:
            next_event = min(deadline, upcoming[0].arrival) if upcoming else deadline
            sleep_until(t0, next_event)
            continue
        images = run_static_batch(pipe, group)
        done = time.monotonic() - t0
        for job, image in zip(group, images, strict=True):
            res.finish[job.id] = done
            res.images[job.id] = image
            waiting.remove(job)
        res.batches.append(len(group))
    return res


# ---------------------------------------------------------------- (c) engine


def serve_engine(pipe: Any, jobs: list[Job], max_rows: int) -> Outcome:
    from service.engine import Engine
    from service.engine_types import GenerationRequest

    res = Outcome()
    engine = Engine(pipe, max_batch=max_rows)
    handles = []
    t0 = time.monotonic()
    driver = EngineDriver(engine)
    try:
        for job in jobs:
            sleep_until(t0, job.arrival)
            req = GenerationRequest.of(
                job.id,
                prompt=job.prompt,
                width=job.width,
                height=job.height,
                steps=job.steps,
                guidance_scale=job.guidance,
                sampler=job.sampler,
                seed=job.seed,
            )
            handles.append(engine.submit(req))
        for h in handles:
            if not h.wait(timeout=3600):
                raise RuntimeError(f"{h.id} did not finish")
    finally:
        driver.stop()
    res.batches.extend(rows // 2 for rows in driver.rows)
    for h in handles:
        if h.error or not h.images:
            raise RuntimeError(f"{h.id} failed: {h.error}")
        res.finish[h.id] = h.finished_at - t0
        res.images[h.id] = h.images[0]
    return res


# ---------------------------------------------------------------- report


def summarize(name: str, jobs: list[Job], res: Outcome) -> dict[str, Any]:
    lat = np.array([res.finish[j.id] - j.arrival for j in jobs])
    span = max(res.finish.values()) - min(j.arrival for j in jobs)
    return {
        "mode": name,
        "images_per_s": len(jobs) / span,
        "makespan_s": span,
        "latency_mean_s": float(lat.mean()),
        "latency_p95_s": float(np.percentile(lat, 95)),
        "mean_batch_images": float(np.mean(res.batches)) if res.batches else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--unet", choices=["demo", "sd15"], default="demo")
    p.add_argument("--latent", type=int, default=None, help="latent side (demo 8, sd15 16)")
    p.add_argument("--jobs", type=int, default=None, help="demo 32, sd15 8")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25, 30])
    p.add_argument("--load", type=float, default=3.0, help="arrival rate / serial capacity")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-rows", type=int, default=16, help="engine max_batch (UNet rows)")
    p.add_argument("--static-batch", type=int, default=8, help="static batch size (images)")
    p.add_argument("--static-window", type=float, default=None, help="static batching timeout s")
    p.add_argument("--uniform", action="store_true", help="all jobs share settings (static's best)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="6 short jobs (smoke test)")
    args = p.parse_args()
    if args.latent is None:
        args.latent = 16 if args.unet == "sd15" else 8
    if args.jobs is None:
        args.jobs = 8 if args.unet == "sd15" else 32
    if args.quick:
        args.jobs, args.steps = 6, [3, 4]
    threads = set_threads(args.threads)
    print(f"load average at start: {load_average()}")

    with tempfile.TemporaryDirectory(prefix="ldm-bench-engine-") as tmp:
        ref, ours = build_models(args.unet, Path(tmp) / "pipeline")
    ref.unet.eval(), ref.vae.eval(), ref.text_encoder.eval()

    # Calibration (also the warm-up): one solo job per size and sampler through diffusers.
    mean_steps = float(np.mean(args.steps))
    sizes = {(8 * args.latent, 8 * args.latent), (12 * args.latent, 8 * args.latent)}
    solo = []
    for w, h in sorted(sizes):
        job = Job("probe", 0.0, "warm", w, h, round(mean_steps), "euler_a", 7.5, 0)
        run_diffusers_job(ref, job)  # warm-up
        solo.append(min(timed_job(ref, job) for _ in range(2)))
        run_static_batch(ours, [job, job])  # warm our path at this size too
    service_s = float(np.mean(solo))
    rate = args.load / service_s
    window = args.static_window if args.static_window is not None else 0.25 * service_s
    jobs = make_jobs(args.jobs, rate, args.latent, args.steps, args.seed, args.uniform)
    print(
        f"model={args.unet} latent={args.latent} jobs={len(jobs)} steps={args.steps} "
        f"solo diffusers job ~{service_s:.2f}s -> arrival rate {rate:.2f}/s (load {args.load}), "
        f"arrivals over {jobs[-1].arrival:.1f}s; static: up to {args.static_batch} images with "
        f"identical (size, steps, sampler, guidance), window {window:.2f}s; engine max_batch "
        f"{args.max_rows} rows"
    )

    runs = {}
    for name, fn in (
        ("a_serial_diffusers", lambda: serve_serial(ref, jobs)),
        ("b_static_batching", lambda: serve_static(ours, jobs, args.static_batch, window)),
        ("c_engine", lambda: serve_engine(ours, jobs, args.max_rows)),
    ):
        t = time.monotonic()
        runs[name] = fn()
        print(f"{name}: {time.monotonic() - t:.1f}s wall, load {load_average()}")

    summary = {name: summarize(name, jobs, res) for name, res in runs.items()}
    a, b, c = (summary[k] for k in ("a_serial_diffusers", "b_static_batching", "c_engine"))
    diff = max(
        int(
            np.abs(
                runs["a_serial_diffusers"].images[j.id].astype(int)
                - runs["c_engine"].images[j.id].astype(int)
            ).max()
        )
        for j in jobs
    )
    print(
        table(
            ["mode", "images/s", "mean lat s", "p95 lat s", "mean batch (images)"],
            [
                [
                    s["mode"],
                    s["images_per_s"],
                    s["latency_mean_s"],
                    s["latency_p95_s"],
                    s["mean_batch_images"],
                ]
                for s in summary.values()
            ],
        )
    )
    ratios = {
        "throughput_c_over_a": c["images_per_s"] / a["images_per_s"],
        "throughput_c_over_b": c["images_per_s"] / b["images_per_s"],
        "mean_latency_c_vs_b": c["latency_mean_s"] / b["latency_mean_s"] - 1.0,
        "p95_latency_c_vs_b": c["latency_p95_s"] / b["latency_p95_s"] - 1.0,
    }
    print(
        f"(c)/(a) throughput {ratios['throughput_c_over_a']:.2f}x (goal >= 2.0); "
        f"(c)/(b) throughput {ratios['throughput_c_over_b']:.2f}x; "
        f"(c) mean latency {100 * ratios['mean_latency_c_vs_b']:+.0f}% vs (b) "
        f"(goal <= -30% at >= 1.0x throughput); max pixel diff (a) vs (c): {diff}/255"
    )
    emit_json(
        "engine",
        {
            "threads": threads,
            "quick": args.quick,
            "unet": args.unet,
            "latent": args.latent,
            "jobs": len(jobs),
            "arrival_rate": rate,
            "serial_job_s": service_s,
            "static_window_s": window,
            "max_pixel_diff_a_vs_c": diff,
            "modes": summary,
            **ratios,
        },
    )


def timed_job(ref: Any, job: Job) -> float:
    t = time.perf_counter()
    run_diffusers_job(ref, job)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
