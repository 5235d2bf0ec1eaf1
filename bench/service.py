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

    .venv/bin/python bench/service.py              # demo model, 48 jobs 256x256/384x256, 3 repeats
    .venv/bin/python bench/service.py --model /path/to/sd15.safetensors --jobs 8
    .venv/bin/python bench/service.py --quick      # smoke test: 6 jobs 64x64, 200 submits
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import httpx
import numpy as np
from common import emit_json, load_average, median, set_threads, table

SAMPLERS = ("euler_a", "ddim", "dpmpp_2m", "euler")
PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "an old map", "a bowl of cherries")
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Job:
    prompt: str
    width: int
    height: int
    steps: int
    sampler: str
    seed: int
    guidance: float = 7.5

    def body(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "sampler": self.sampler,
            "seed": self.seed,
            "guidance_scale": self.guidance,
            "output_format": "png",
        }


def make_jobs(n: int, sizes: list[tuple[int, int]], steps: list[int], seed: int) -> list[Job]:
    """n jobs with fixed seeds: mixed sizes, steps, samplers and prompts (as bench/engine.py)."""
    rng = random.Random(seed)
    return [
        Job(
            prompt=rng.choice(PROMPTS),
            width=(size := rng.choice(sizes))[0],
            height=size[1],
            steps=rng.choice(steps),
            sampler=rng.choice(SAMPLERS),
            seed=1000 + i,
        )
        for i in range(n)
    ]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (Linux /proc), None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- (a) engine in-process


class EngineRunner:
    """One Engine for the whole run (as a worker keeps one), fed a round at a time."""

    def __init__(self, pipe: Any, max_batch: int) -> None:
        from service.engine import Engine

        self.rows: list[int] = []
        self.engine = Engine(pipe, max_batch=max_batch, on_batch=lambda r, _j: self.rows.append(r))
        self.engine.start()

    def run(self, jobs: list[Job], timeout: float) -> tuple[float, list[np.ndarray], list[int]]:
        from service.engine_types import GenerationRequest

        self.rows = []
        t0 = time.monotonic()
        handles = [
            self.engine.submit(
                GenerationRequest(
                    id=f"a{i}",
                    prompt=j.prompt,
                    width=j.width,
                    height=j.height,
                    steps=j.steps,
                    guidance_scale=j.guidance,
                    sampler=j.sampler,
                    seed=j.seed,
                )
            )
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
        return elapsed, [h.images[0] for h in handles], list(self.rows)

    def stop(self) -> None:
        self.engine.stop()


# ---------------------------------------------------------------- (b) through the service


async def _wait_sse(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Follow the job's event stream until its `done` event; return the final view."""
    event = ""
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"events {job_id}: HTTP {resp.status_code}")
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("done", "error"):
                data = json.loads(line[5:])
                if event == "error":
                    raise RuntimeError(f"events {job_id}: {data}")
                return data
    raise RuntimeError(f"events {job_id}: stream ended without a final state")


async def _wait_poll(client: httpx.AsyncClient, job_id: str, interval: float) -> dict[str, Any]:
    while True:  # bounded by the round's asyncio timeout
        r = await client.get(f"/v1/jobs/{job_id}")
        r.raise_for_status()
        view = r.json()
        if view["status"] in TERMINAL:
            return view
        await asyncio.sleep(interval)


async def _service_round(
    base: str, jobs: list[Job], wait: str, poll_s: float
) -> tuple[float, list[bytes]]:
    limits = httpx.Limits(max_connections=len(jobs) + 8, max_keepalive_connections=len(jobs) + 8)
    timeout = httpx.Timeout(60.0)  # > the SSE keep-alive interval (15 s)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:

        async def download(job_id: str, view: dict[str, Any]) -> bytes:
            if view["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {view['status']}: {view.get('error')}")
            r = await client.get(f"/v1/jobs/{job_id}/images/0")
            r.raise_for_status()
            return r.content

        async def follow(job_id: str) -> bytes:
            return await download(job_id, await _wait_sse(client, job_id))

        t0 = time.monotonic()
        ids, tasks = [], []
        for job in jobs:  # in order, so the queue holds them in (a)'s order
            r = await client.post("/v1/jobs", json=job.body())
            if r.status_code != 202:
                raise RuntimeError(f"submit: HTTP {r.status_code} {r.text[:300]}")
            ids.append(r.json()["id"])
            if wait == "sse":  # one event stream per job, opened at once
                tasks.append(asyncio.create_task(follow(ids[-1])))
        if wait == "sse":
            try:
                images = list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:
                    t.cancel()
        else:  # poll the oldest unfinished job; later ones that finished early cost one GET
            images = []
            for job_id in ids:
                images.append(await download(job_id, await _wait_poll(client, job_id, poll_s)))
        return time.monotonic() - t0, images


def service_round(
    base: str, jobs: list[Job], wait: str, poll_s: float, timeout: float
) -> tuple[float, list[bytes]]:
    return asyncio.run(asyncio.wait_for(_service_round(base, jobs, wait, poll_s), timeout))


def batch_rows_metric(base: str) -> tuple[float, float]:
    """(sum, count) of ldmserve_unet_batch_rows from /metrics ((0, 0) if unavailable)."""
    try:
        text = httpx.get(f"{base}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0, 0.0
    vals = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"ldmserve_unet_batch_rows{suffix} "):
                vals[suffix] = float(line.split()[-1])
    return vals.get("_sum", 0.0), vals.get("_count", 0.0)


# ---------------------------------------------------------------- (c) submit throughput


class RawConnection:
    """A minimal HTTP/1.1 keep-alive connection for the submit load (POST JSON, read reply).

    The load generator shares the API's cores; httpx.AsyncClient spent ~17 ms of CPU per
    request with 64 pooled connections here (2.7 ms with one), so it measured itself. This
    writes the request bytes and reads the status line, headers and Content-Length body.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, payload: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode() + payload)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if b"content-length" not in headers:
            raise RuntimeError(f"response without Content-Length: {lines[:8]}")
        await self.reader.readexactly(int(headers[b"content-length"]))
        if headers.get(b"connection") == b"close":
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def _submit_storm(
    base: str, kind: str, clients: int, total: int, seconds: float
) -> dict[str, Any]:
    """`clients` concurrent submitters, each one connection, until `total` sent or `seconds`."""
    url = httpx.URL(base)
    body = {"prompt": "a red fox in snow", "width": 64, "height": 64, "steps": 4}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    pool = httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0)
    raw = [RawConnection(url.host, url.port or 80) for _ in range(clients)]

    async def post(k: int, seed: int) -> int:
        if kind == "httpx":
            return (await pool.post("/v1/jobs", json={**body, "seed": seed})).status_code
        payload = json.dumps({**body, "seed": seed}).encode()
        return await asyncio.wait_for(raw[k].post_json("/v1/jobs", payload), 30.0)

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    sent = 0
    try:
        # Untimed warm-up: open the connections (one request per client at once).
        await asyncio.gather(*(post(k, 0) for k in range(clients)))
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def one_client(k: int) -> None:
            nonlocal sent
            while sent < total and time.perf_counter() < deadline:
                sent += 1
                start = time.perf_counter()
                try:
                    statuses[await post(k, sent)] += 1
                except (OSError, httpx.HTTPError, asyncio.TimeoutError, RuntimeError) as exc:
                    errors[type(exc).__name__] += 1
                    await raw[k].close()
                latencies.append(time.perf_counter() - start)

        cpu0 = time.process_time()
        await asyncio.gather(*(one_client(k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
        client_cpu = time.process_time() - cpu0
    finally:
        await pool.aclose()
        for conn in raw:
            await conn.close()
    ok = statuses.get(202, 0)
    lat_ms = np.array(latencies) * 1000
    return {
        "client": kind,
        "clients": clients,
        "requests": len(latencies),
        "accepted": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
        "seconds": elapsed,
        "submits_per_s": ok / elapsed,
        "latency_p50_ms": float(np.percentile(lat_ms, 50)),
        "latency_p99_ms": float(np.percentile(lat_ms, 99)),
        "latency_max_ms": float(lat_ms.max()),
        "client_cpu_s": client_cpu,
    }


# ---------------------------------------------------------------- processes


def service_env(redis_url: str, model: str, threads: int, max_jobs: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDMSERVE_")}
    return {
        **env,
        "LDMSERVE_REDIS_URL": redis_url,
        "LDMSERVE_MODEL": model,
        "LDMSERVE_RATE_LIMIT_PER_MIN": "0",
        "LDMSERVE_MAX_QUEUED_PER_KEY": "0",  # 0 = no cap
        "LDMSERVE_MAX_QUEUE": str(max(100_000, 2 * max_jobs)),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }


def wait_http(base: str, path: str, ok: Any, proc: subprocess.Popen[bytes], what: str) -> None:
    from tests.processes import wait_until

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            r = httpx.get(f"{base}{path}", timeout=2)
        except httpx.HTTPError:
            return False
        return bool(r.status_code == 200 and ok(r))

    wait_until(ready, 240, what, 0.2)


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---------------------------------------------------------------- main


def compare_images(ref: list[np.ndarray], got: list[bytes]) -> tuple[int, int]:
    """(PNGs byte-identical to the worker's encoding of `ref`, max pixel difference)."""
    from PIL import Image

    from service.worker import encode_images

    same, diff = 0, 0
    for pixels, data in zip(ref, got, strict=True):
        same += encode_images([pixels], "png")[0] == data
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
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
    p.add_argument("--repeats", type=int, default=3)
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
                        _submit_storm(base, kind, args.clients, args.submits, args.submit_seconds),
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
        f"\n(b)/(a) images/s = {ratio:.3f} (goal >= 0.95); PNGs identical to (a)'s: "
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
