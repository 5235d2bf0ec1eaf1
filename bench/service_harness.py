"""What drives the service in bench/service.py: its job mix, a minimal HTTP client, the submit
load, and the API / worker processes (see bench/service.py for what is measured and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import httpx
import numpy as np

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

    def request_fields(self) -> dict[str, Any]:
        """The generation parameters, named as the API and GenerationRequest name them."""
        return {
            "prompt": self.prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "sampler": self.sampler,
            "seed": self.seed,
            "guidance_scale": self.guidance,
        }

    def body(self) -> dict[str, Any]:
        """The POST /v1/jobs body."""
        return {**self.request_fields(), "output_format": "png"}


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


async def submit_storm(
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
