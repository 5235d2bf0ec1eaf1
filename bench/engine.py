"""One reproducible workload served three ways on the same weights, in one process.

(a) serial: one job at a time through diffusers' StableDiffusionPipeline (scheduler switched
    per job to the diffusers class our sampler reproduces).
(b) static: diffusers with a dynamic batcher as Triton/SGLang-style servers do it: take the
    oldest waiting job, wait until `--static-batch` waiting jobs share everything diffusers
    can batch (size, steps, sampler, guidance; prompts and seeds may differ: one generator
    per image) or `--static-window` s have passed since it arrived, then run that group as
    one diffusers call.
(c) engine: service.engine.Engine (step-level continuous batching) with the settings a worker
    uses by default: call costs measured at warm-up (service.call_cost; not timed) and the
    admission wait; jobs submitted at their arrival times.

Workloads: `mixed` (default; two sizes, mixed steps and samplers, Poisson arrivals at
`--load` times the rate one-at-a-time serving (a) sustains, measured in a calibration run)
and `groups` (`--jobs` jobs in settings groups of one size and sampler, one group per
`--steps` value, interleaved; all at once, or Poisson with `--load`). A job's latency is
finish - arrival, throughput = images / (last finish - first arrival). Weights: a diffusers
pipeline (demo-sized UNet, or SD 1.5's with `--unet sd15`) with random weights, saved with
save_pretrained and loaded by model.load_pipeline, so both sides run identical weights; the
max pixel difference between (a)'s and (c)'s images for the same jobs is printed as a check.

    .venv/bin/python bench/engine.py                          # demo-sized model, 32 jobs
    .venv/bin/python bench/engine.py --unet sd15 --latent 16  # SD 1.5 UNet, 8 jobs
    .venv/bin/python bench/engine.py --unet sd15 --latent 32 --workload groups --jobs 6 \
        --steps 2 4 --sampler ddim                            # issue 17's burst at 256x256
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
    make_group_jobs,
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


def run_static_batch(ref: Any, batch: list[Job]) -> np.ndarray:
    """One group of identical batchable settings as one diffusers call: a prompt and a
    generator per image, as a batching server would call it."""
    head = batch[0]
    ref.scheduler = diffusers_scheduler(head.sampler)
    with torch.inference_mode():
        out = ref(
            [j.prompt for j in batch],
            num_inference_steps=head.steps,
            guidance_scale=head.guidance,
            width=head.width,
            height=head.height,
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            output_type="np",
        ).images
    return (out * 255).round().astype(np.uint8)


def serve_static(ref: Any, jobs: list[Job], max_images: int, window: float) -> Outcome:
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
        images = run_static_batch(ref, group)
        done = time.monotonic() - t0
        for job, image in zip(group, images, strict=True):
            res.finish[job.id] = done
            res.images[job.id] = image
            waiting.remove(job)
        res.batches.append(len(group))
    return res


# ---------------------------------------------------------------- (c) engine


def serve_engine(pipe: Any, jobs: list[Job], max_rows: int, costs: Any) -> Outcome:
    from service.engine import Engine
    from service.engine_types import GenerationRequest
    from service.settings import Settings

    res = Outcome()
    wait = Settings().admission_wait_s  # the worker's default
    engine = Engine(pipe, max_batch=max_rows, call_costs=costs, admission_wait_s=wait)
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


def median_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds (one round: that round's figures)."""
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, float):
            out[key] = float(np.median([r[key] for r in results]))
    out["rounds"] = len(results)
    return out


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
    p.add_argument("--workload", choices=["mixed", "groups"], default="mixed")
    p.add_argument("--sampler", default="ddim", help="groups workload: the sampler")
    p.add_argument("--burst", action="store_true", help="groups workload: all jobs at once")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="6 short jobs (smoke test)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of (b) and (c), alternated")
    p.add_argument("--compile", action="store_true", help="engine UNet compiled (buckets), as "
                   "a worker with compile_unet=true (default: eager, the worker's default)")  # fmt: skip
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
    sizes = {(8 * args.latent, 8 * args.latent)}
    if args.workload == "mixed":
        sizes.add((12 * args.latent, 8 * args.latent))
    solo = []
    for w, h in sorted(sizes):
        job = Job("probe", 0.0, "warm", w, h, round(mean_steps), "euler_a", 7.5, 0)
        run_diffusers_job(ref, job)  # warm-up
        solo.append(min(timed_job(ref, job) for _ in range(2)))
        run_static_batch(ref, [job, job])  # warm the batched path at this size too
        ours.generate("warm", width=w, height=h, steps=1, num_images=2)
    service_s = float(np.mean(solo))
    rate = args.load / service_s
    window = args.static_window if args.static_window is not None else 0.25 * service_s
    if args.workload == "groups":
        jobs = make_group_jobs(args.jobs, args.latent, args.steps, args.sampler,
                               None if args.burst else rate, args.seed)  # fmt: skip
    else:
        jobs = make_jobs(args.jobs, rate, args.latent, args.steps, args.seed, args.uniform)
    from service.settings import Settings
    from service.warm_up import warm_up

    t = time.monotonic()
    # As a worker warms up with its defaults (eager unless --compile,
    # call costs measured), at the jobs' size rather than the model's native one.
    side = 8 * args.latent
    settings = Settings(max_batch=args.max_rows, compile_unet=args.compile,
                        compile_sides=[side], call_sizing_side=side)  # fmt: skip
    costs = warm_up(ours, settings)
    compiled = ours.compiled_unet is not None
    print(f"engine warm-up {time.monotonic() - t:.1f}s (UNet compiled: {compiled}); call costs: "
          + ", ".join(f"{int(w)} rows {s:.3f}s" for w, s in costs.points))  # type: ignore[union-attr]  # fmt: skip
    arrivals = "at once" if args.workload == "groups" and args.burst else (
        f"Poisson {rate:.2f}/s (load {args.load}) over {jobs[-1].arrival:.1f}s")  # fmt: skip
    print(
        f"model={args.unet} latent={args.latent} workload={args.workload} jobs={len(jobs)} "
        f"steps={args.steps} solo diffusers job ~{service_s:.2f}s; arrivals {arrivals}; "
        f"static: up to {args.static_batch} images with identical (size, steps, sampler, "
        f"guidance), window {window:.2f}s; engine max_batch {args.max_rows} rows"
    )

    runs: dict[str, Outcome] = {}
    rounds: dict[str, list[dict[str, Any]]] = {}
    serve = {
        "a_serial_diffusers": lambda: serve_serial(ref, jobs),
        "b_static_diffusers": lambda: serve_static(ref, jobs, args.static_batch, window),
        "c_engine": lambda: serve_engine(ours, jobs, args.max_rows, costs),
    }
    order = ["a_serial_diffusers"]  # (a) once; (b) and (c) alternate, flipped every round
    for r in range(args.rounds):
        order += ["b_static_diffusers", "c_engine"][:: 1 if r % 2 == 0 else -1]
    for name in order:
        t = time.monotonic()
        runs[name] = serve[name]()
        rounds.setdefault(name, []).append(summarize(name, jobs, runs[name]))
        print(f"{name}: {time.monotonic() - t:.1f}s wall, load {load_average()}")

    summary = {name: median_summary(results) for name, results in rounds.items()}
    a, b, c = (summary[k] for k in ("a_serial_diffusers", "b_static_diffusers", "c_engine"))
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
        "wall_c_over_b": c["makespan_s"] / b["makespan_s"],
        "mean_latency_c_over_b": c["latency_mean_s"] / b["latency_mean_s"],
    }
    print(
        f"(c)/(a) throughput {ratios['throughput_c_over_a']:.2f}x; "
        f"(c)/(b) wall time {ratios['wall_c_over_b']:.3f} (goal <= 1.00), "
        f"mean latency {ratios['mean_latency_c_over_b']:.3f} (goal <= 0.90), "
        f"p95 latency {1 + ratios['p95_latency_c_vs_b']:.3f}; "
        f"max pixel diff (a) vs (c): {diff}/255"
    )
    bound = (
        burst_bound(ours, jobs, costs, args, ratios["wall_c_over_b"])
        if args.workload == "groups" and args.burst
        else None
    )
    if bound is not None:
        print(bound.pop("text"))
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
            "engine_unet_compiled": compiled,
            "modes": summary,
            "schedule_bound": bound,
            **ratios,
        },
    )


def burst_bound(
    ours: Any, jobs: list[Job], costs: Any, args: argparse.Namespace, engine_wall: float
) -> dict | None:
    """The best any step schedule could do on this burst with the engine's measured call
    costs (bench/schedule_bound.py), against static batching's schedule on the same costs;
    and the least mean latency any schedule has at the engine's measured wall ratio."""
    from schedule_bound import MAX_JOBS, best_at_wall, groups_in_turn, pareto

    from model.samplers import plan

    if len(jobs) > MAX_JOBS or costs is None:
        return None
    pixels = args.latent * args.latent
    rows = 2  # one image with classifier-free guidance
    work = {j.id: (plan(j.sampler, j.steps, ours.schedule).n_evals, rows) for j in jobs}
    waiting, groups = list(jobs), []
    while waiting:  # as serve_static takes a burst: the oldest job's batchable group first
        group = [j for j in waiting if j.key == waiting[0].key][: args.static_batch]
        waiting = [j for j in waiting if j not in group]
        groups.append([work[j.id] for j in group])
    static = groups_in_turn(groups, lambda r: costs.seconds(r, pixels))
    front = pareto(
        list(work.values()),
        lambda r: costs.split_seconds([rows] * (r // rows), pixels, args.max_rows),
    )
    n = len(jobs)
    at_static = best_at_wall(front, static[0])
    least = min(front, key=lambda p: p[1])
    fastest = front[0]
    at_engine = best_at_wall(front, engine_wall * static[0])

    def ratio(p: tuple[float, float]) -> tuple[float, float]:
        return p[0] / static[0], p[1] / static[1]

    lines = [
        "schedule bound (every schedule of whole jobs per step, UNet seconds from the measured "
        f"call costs; static's own schedule: wall {static[0]:.1f}s, mean {static[1] / n:.1f}s):",
        "  least wall: wall {:.3f}, mean {:.3f} of static's".format(*ratio(fastest)),
        "  least mean at wall <= static's: wall {:.3f}, mean {:.3f}".format(*ratio(at_static))
        if at_static
        else "  no schedule is as short as static's",
        "  least mean at any wall: wall {:.3f}, mean {:.3f}".format(*ratio(least)),
        "  least mean at the engine's wall ratio: wall {:.3f}, mean {:.3f}".format(
            *ratio(at_engine)
        )
        if at_engine
        else "  no schedule is as short as the engine's run",
    ]
    return {
        "static_model": {"wall_s": static[0], "mean_s": static[1] / n},
        "least_wall": ratio(fastest),
        "least_mean_at_static_wall": ratio(at_static) if at_static else None,
        "least_mean": ratio(least),
        "least_mean_at_engine_wall": ratio(at_engine) if at_engine else None,
        "text": "\n".join(lines),
    }


def timed_job(ref: Any, job: Job) -> float:
    t = time.perf_counter()
    run_diffusers_job(ref, job)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
