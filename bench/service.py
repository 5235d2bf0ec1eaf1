"""What the service costs: one workload through HTTP + Redis + worker vs the engine in-process.

(a) engine: service.engine.Engine in this process (the worker's max_batch, torch threads as
    the worker's), every job submitted at once; images/s = jobs / (first submit -> last job
    done). PNG encoding is not timed here (the worker encodes in a side thread, timed in (b)).
(b) service: a redis-server, one `ldmserve api` (uvicorn) and one `ldmserve worker` (same
    model, same --max-batch, OMP_NUM_THREADS = the same thread count) on loopback; this
    process is the client: it POSTs every job in order (httpx), follows each job's SSE stream
    (or polls, `--wait poll`) until it is done and downloads its PNG; images/s = jobs /
    (first submit -> last image downloaded).
Runs alternate (a)/(b) (the order flips every repeat) after a small untimed warm-up of both;
medians are reported with the ratio (b)/(a) (goal >= 0.95). Every job has a fixed seed, so
(b)'s PNGs are compared with (a)'s images encoded by the worker's own encoder.

(c) submit throughput: the worker is stopped, then `--clients` (64) concurrent asyncio
    clients (one httpx.AsyncClient, a connection each) POST small jobs to the one API process
    as fast as it answers, until `--submits` requests were sent or `--submit-seconds` passed;
    submits/s and p50/p99 latency. The jobs just queue (nobody runs them); Redis is flushed
    after.

Rate limiting and the per-key caps are switched off in the service's environment (a
benchmark is one client), LDMSERVE_MAX_QUEUE is raised. Everything else is the default
deployment (INFO logs, uvicorn access log, AOF everysec). All processes share this
machine's cores: (b) pays for the API, Redis and this client process on the same CPUs as
the worker, which is part of what is measured; their CPU seconds are printed.

    .venv/bin/python bench/service.py              # demo model, 48 jobs 256x256/384x256, 5 repeats
    .venv/bin/python bench/service.py --model /path/to/sd15.safetensors --jobs 8
    .venv/bin/python bench/service.py --quick      # smoke test: 6 jobs 64x64, 200 submits
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
from common import EngineDriver, emit_json, load_average, median, set_threads, table
from service_harness import (
    SAMPLERS,
    Job,
    batch_rows_metric,
    cpu_seconds,
    log_tail,
    make_jobs,
    service_env,
    service_round,
    submit_storm,
    wait_http,
)

# ---------------------------------------------------------------- (a) engine in-process


class EngineRunner:
    """One Engine for the whole run (as a worker keeps one), fed a round at a time."""

    def __init__(self, pipe: Any, max_batch: int) -> None:
        from service.engine import Engine

        self.engine = Engine(pipe, max_batch=max_batch)
        self.driver = EngineDriver(self.engine)

    def run(self, jobs: list[Job], timeout: float) -> tuple[float, list[np.ndarray], list[int]]:
        from service.engine_types import GenerationRequest

        self.driver.rows.clear()
        t0 = time.monotonic()
        handles = [
            self.engine.submit(GenerationRequest.of(f"a{i}", **j.request_fields()))
            for i, j in enumerate(jobs)
        ]
        deadline = t0 + timeout
        for h in handles:
            if not h.wait(timeout=max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"engine job {h.id} did not finish in {timeout}s")
        elapsed = time.monotonic() - t0
        for h in handles:
            if h.error or not h.images:
                raise RuntimeError(f"engine job {h.id} failed: {h.error}")
        return elapsed, [h.images[0] for h in handles], list(self.driver.rows)

    def stop(self) -> None:
        self.driver.stop()


# ---------------------------------------------------------------- main


def compare_images(ref: list[np.ndarray], got: list[bytes]) -> tuple[int, int]:
    """(PNGs byte-identical to the worker's encoding of `ref`, max pixel difference)."""
    from PIL import Image

    from service.image_output import encode_images

    same, diff = 0, 0
    for pixels, data in zip(ref, got, strict=True):
        image = Image.open(io.BytesIO(data))
        text = image.info.get("parameters")  # the worker's A1111 chunk, written again
        same += encode_images([pixels], "png", [text] if text else None)[0] == data
        decoded = np.asarray(image.convert("RGB"))
        if decoded.shape != pixels.shape:
            return same, 255
        diff = max(diff, int(np.abs(decoded.astype(int) - pixels.astype(int)).max()))
    return same, diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", default="demo", help="any source load_pipeline/`ldmserve worker` take"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=48)
    p.add_argument("--sizes", nargs="+", default=["256x256", "384x256"], help="WxH, mixed")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-batch", type=int, default=16, help="UNet rows, engine and worker")
    p.add_argument("--threads", type=int, default=2, help="torch threads, here and in the worker")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--wait",
        choices=["sse", "poll"],
        default="sse",
        help="sse: one event stream per job; poll: GET the oldest unfinished job every --poll-s",
    )
    p.add_argument("--poll-s", type=float, default=0.25)
    p.add_argument("--round-timeout", type=float, default=1200.0, help="seconds per timed round")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--submits", type=int, default=3000)
    p.add_argument("--submit-seconds", type=float, default=20.0)
    p.add_argument(
        "--submit-client",
        nargs="+",
        choices=["raw", "httpx"],
        default=["raw", "httpx"],
        help="load generator(s) for the submit test: raw asyncio HTTP/1.1, httpx.AsyncClient",
    )
    p.add_argument("--quick", action="store_true", help="6 jobs 64x64, 200 submits (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.jobs, args.sizes, args.steps, args.repeats = 6, ["64x64"], [2, 3], 1
        args.submits, args.submit_seconds, args.submit_client = 200, 10.0, ["raw"]
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    threads = set_threads(args.threads)
    print(f"load average at start: {load_average()}")

    from model import load_pipeline
    from service.redis_server import RedisServer, free_port
    from tests.processes import spawn, stop

    jobs = make_jobs(args.jobs, sizes, args.steps, args.seed)  # type: ignore[arg-type]
    warm = [Job("warm-up", w, h, min(args.steps), "euler", 1) for w, h in sizes]
    print(
        f"model={args.model} device={args.device} jobs={len(jobs)} sizes={args.sizes} "
        f"steps={args.steps} samplers={list(SAMPLERS)} CFG 7.5, max_batch={args.max_batch} rows, "
        f"threads={threads} (worker: OMP_NUM_THREADS={args.threads}), client waits by {args.wait}"
    )

    procs: dict[str, subprocess.Popen[bytes]] = {}
    runner: EngineRunner | None = None
    with tempfile.TemporaryDirectory(prefix="ldm-bench-service-") as tmp:
        root = Path(tmp)
        redis = RedisServer(root / "redis")
        try:
            redis.start()
            env = service_env(redis.url, args.model, args.threads, args.submits + 1000)
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            procs["api"] = spawn(["api", "--port", str(port)], env, root / "api.log")
            worker_args = ["worker", "--model", args.model, "--device", args.device]
            worker_args += ["--max-batch", str(args.max_batch)]
            procs["worker"] = spawn(worker_args, env, root / "worker.log")
            # The worker loads its copy of the model while this process loads its own.
            runner = EngineRunner(load_pipeline(args.model, device=args.device), args.max_batch)
            wait_http(base, "/healthz", lambda r: True, procs["api"], "the API")
            wait_http(base, "/readyz", lambda r: True, procs["worker"], "a live worker")

            # Untimed warm-up of both paths (not in --quick): one job per size (new shapes).
            if not args.quick:
                runner.run(warm, args.round_timeout)
                service_round(base, warm, args.wait, args.poll_s, args.round_timeout)

            pids = {
                "worker": procs["worker"].pid,
                "api": procs["api"].pid,
                "redis": redis.process.pid if redis.process else -1,
                "client+engine (this)": os.getpid(),
            }
            times: dict[str, list[float]] = {"engine": [], "service": []}
            cpu: dict[str, dict[str, float]] = {"engine": Counter(), "service": Counter()}
            ref_images: list[np.ndarray] | None = None
            engine_rows: list[int] = []
            service_pngs: list[list[bytes]] = []
            service_rows = [0.0, 0.0]
            for r in range(args.repeats):
                order = ["engine", "service"] if r % 2 == 0 else ["service", "engine"]
                for mode in order:
                    before = {k: cpu_seconds(v) for k, v in pids.items()}
                    load0 = load_average()
                    if mode == "engine":
                        elapsed, images, rows = runner.run(jobs, args.round_timeout)
                        ref_images = ref_images or images
                        engine_rows += rows
                    else:
                        s0, c0 = batch_rows_metric(base)
                        elapsed, pngs = service_round(
                            base, jobs, args.wait, args.poll_s, args.round_timeout
                        )
                        s1, c1 = batch_rows_metric(base)
                        service_rows[0] += s1 - s0
                        service_rows[1] += c1 - c0
                        service_pngs.append(pngs)
                    for k, v in pids.items():
                        b, a = before[k], cpu_seconds(v)
                        if a is not None and b is not None:
                            cpu[mode][k] += a - b
                    times[mode].append(elapsed)
                    print(
                        f"repeat {r + 1} {mode}: {elapsed:.2f}s, {len(jobs) / elapsed:.3f} images/s"
                        f" (load {load0} -> {load_average()})",
                        flush=True,
                    )

            assert ref_images is not None
            checks = [compare_images(ref_images, pngs) for pngs in service_pngs]
            same = min(c[0] for c in checks)
            max_diff = max(c[1] for c in checks)

            # (c) submit throughput against the one API process, no worker consuming.
            t_stop = time.monotonic()
            stop(procs.pop("worker"), signal.SIGTERM, 60)
            print(f"worker stopped (SIGTERM) in {time.monotonic() - t_stop:.1f}s", flush=True)
            storms = []
            for kind in args.submit_client:
                api_cpu0 = cpu_seconds(procs["api"].pid)
                redis_cpu0 = cpu_seconds(pids["redis"])
                storm = asyncio.run(
                    asyncio.wait_for(
                        submit_storm(base, kind, args.clients, args.submits, args.submit_seconds),
                        args.submit_seconds + 120,
                    )
                )
                api_cpu1 = cpu_seconds(procs["api"].pid)
                redis_cpu1 = cpu_seconds(pids["redis"])
                if api_cpu0 is not None and api_cpu1 is not None:
                    storm["api_cpu_s"] = api_cpu1 - api_cpu0
                if redis_cpu0 is not None and redis_cpu1 is not None:
                    storm["redis_cpu_s"] = redis_cpu1 - redis_cpu0
                storms.append(storm)
            import redis as redis_lib

            with redis_lib.Redis.from_url(redis.url) as rc:
                rc.flushdb()
        except BaseException:
            for name in procs:
                print(f"--- {name} log tail ---\n{log_tail(root / f'{name}.log')}")
            raise
        finally:
            if runner is not None:
                runner.stop()
            for proc in procs.values():
                stop(proc, signal.SIGTERM, 30)
            redis.stop()

    n = len(jobs)
    e_med, s_med = median(times["engine"]), median(times["service"])
    e_ips, s_ips = n / e_med, n / s_med
    ratio = s_ips / e_ips
    # Each round runs (a) and (b) back to back: their ratio shares that stretch's noise.
    round_ratios = [e / s for e, s in zip(times["engine"], times["service"], strict=True)]
    e_rows = statistics.mean(engine_rows) if engine_rows else 0.0
    s_rows = service_rows[0] / service_rows[1] if service_rows[1] else 0.0
    print()
    print(
        table(
            ["mode", "median s", "images/s", "runs s", "mean UNet rows/call"],
            [
                [
                    "(a) engine in-process",
                    e_med,
                    e_ips,
                    [round(t, 2) for t in times["engine"]],
                    e_rows,
                ],
                [
                    "(b) HTTP+Redis+worker",
                    s_med,
                    s_ips,
                    [round(t, 2) for t in times["service"]],
                    s_rows,
                ],
            ],
        )
    )
    reps = max(1, args.repeats)
    cpu_rows = [
        [k, round(cpu["engine"][k] / reps, 2), round(cpu["service"][k] / reps, 2)] for k in pids
    ]
    print("\nCPU seconds per round, by process:")
    print(table(["process", "(a) engine", "(b) service"], cpu_rows))
    print(
        f"\n(b)/(a) images/s = {ratio:.3f} (goal >= 0.95), median of per-round ratios "
        f"{median(round_ratios):.3f} {[round(r, 3) for r in round_ratios]}; PNGs identical to (a)'s: "
        f"{same}/{n}, max pixel diff {max_diff}/255"
    )
    print(f"\nsubmit throughput: {args.clients} concurrent clients against one API process")
    print(
        table(
            [
                "client",
                "accepted",
                "requests",
                "s",
                "submits/s",
                "p50 ms",
                "p99 ms",
                "max ms",
                "client CPU s",
                "api CPU s",
                "redis CPU s",
                "statuses/errors",
            ],
            [
                [
                    st["client"],
                    st["accepted"],
                    st["requests"],
                    st["seconds"],
                    st["submits_per_s"],
                    st["latency_p50_ms"],
                    st["latency_p99_ms"],
                    st["latency_max_ms"],
                    st["client_cpu_s"],
                    st.get("api_cpu_s", "?"),
                    st.get("redis_cpu_s", "?"),
                    f"{st['statuses']} {st['errors'] or ''}",
                ]
                for st in storms
            ],
        )
    )
    emit_json(
        "service",
        {
            "quick": args.quick,
            "model": args.model,
            "device": args.device,
            "threads": threads,
            "cpus": os.cpu_count(),
            "jobs": n,
            "sizes": args.sizes,
            "steps": args.steps,
            "max_batch": args.max_batch,
            "wait": args.wait,
            "repeats": args.repeats,
            "engine_s": times["engine"],
            "service_s": times["service"],
            "engine_images_per_s": e_ips,
            "service_images_per_s": s_ips,
            "service_over_engine": ratio,
            "per_round_ratios": round_ratios,
            "engine_mean_rows": e_rows,
            "service_mean_rows": s_rows,
            "cpu_s_per_round": {m: dict(c) for m, c in cpu.items()},
            "pngs_identical": same,
            "max_pixel_diff": max_diff,
            "submit": storms[0],
            "submit_runs": storms,
        },
    )


if __name__ == "__main__":
    main()
