"""Fault figures: each fault scenario N times against real processes; jobs lost and
duplicate results (goal 0 for both).

    .venv/bin/python bench/faults.py                  # every scenario, 2 trials (kill,
                                                      # poison, ttl: 1), ~4-5 min on 2 cores
    .venv/bin/python bench/faults.py --trials 3 --trials-of kill=2,poison=2,ttl=1  # ~5-9 min
    .venv/bin/python bench/faults.py --trials 5 --trials-of kill=3 --scenarios kill,api
    .venv/bin/python bench/faults.py --scenarios redis --trials 3 --redis-config deploy/redis.conf
                                          # Redis as shipped (appendfsync everysec)
    .venv/bin/python bench/faults.py --scenarios kill,api --result-store s3   # or file
                                          # results in object storage (SeaweedFS) / a directory

The scenarios are tests/fault_scenarios.py (the same code the fault tests assert on): a
stack of redis-server (AOF, appendfsync always), `ldmserve api` and demo workers run through
tests/fault_worker.py is started once per group and reused by its trials. Every trial's
problems (any broken expectation, e.g. a reclaimed job without a second run) are printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import emit_json, load_average, table

from tests import fault_scenarios as fs
from tests.object_store import BUCKET, SeaweedS3
from tests.processes import Stack

WORKER_ENV = {"LDMSERVE_DRAIN_TIMEOUT_S": "1", "FAULT_SLOW_STEP_S": "0.3"}
INFRA_ENV = {"FAULT_SLOW_STEP_S": "0.2"}
TTL_ENV = {"LDMSERVE_RESULT_TTL_S": "2", "LDMSERVE_JOB_TTL_GRACE_S": "3"}

# name → (stack group, scenario(stack, seed) -> FaultResult)
SCENARIOS: dict[str, tuple[str, Callable[[Stack, int], fs.FaultResult]]] = {
    "kill": ("workers", lambda s, seed: fs.worker_kill(s, seed, rounds=3, per_round=6)),
    "slow": ("workers", fs.slow_worker),
    "drain": ("workers", fs.drain_hand_back),
    "poison": ("workers", lambda s, seed: fs.poison_job(s, seed, others=4)),
    "api": ("infra", lambda s, seed: fs.api_restart(s, seed, n=16)),
    "redis": ("infra", lambda s, seed: fs.redis_restart(s, seed, n=12)),
    "ttl": ("ttl", lambda s, seed: fs.ttl_and_memory(s, seed, n=200)),
}
GROUPS = {"ttl": (1, TTL_ENV), "infra": (1, INFRA_ENV), "workers": (3, WORKER_ENV)}
# A kill trial is itself 3 kills; poison and ttl trials are long: one each unless told.
DEFAULT_TRIALS = "kill=1,poison=1,ttl=1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--trials-of", default=DEFAULT_TRIALS, help="per-scenario trials, e.g. kill=3,api=5"
    )
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=560, help="stop starting trials after")
    parser.add_argument("--keep", action="store_true", help="keep the logs' temp directory")
    parser.add_argument(
        "--redis-config", type=Path, help="run redis-server from this redis.conf (e.g. deploy/)"
    )
    parser.add_argument(
        "--result-store", choices=["redis", "file", "s3"], default="redis",
        help="where workers put images: Redis, a directory, or a SeaweedFS S3 server",
    )  # fmt: skip
    args = parser.parse_args()
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {list(SCENARIOS)}")
    trials = {n: args.trials for n in names}
    for item in filter(None, args.trials_of.split(",")):
        name, _, count = item.partition("=")
        if name in trials:
            trials[name] = int(count)
    root = Path(tempfile.mkdtemp(prefix="ldmserve-faults-"))
    print(f"load average {load_average()}; logs in {root}")
    start = time.monotonic()
    totals: dict[str, dict[str, Any]] = {}
    store_env, s3 = result_store_env(args.result_store, root)
    try:
        run_groups(args, names, trials, root, start, totals, store_env)
    finally:
        if s3 is not None:
            s3.stop()
    headers = ["fault scenario", "trials", "jobs accepted", "jobs completed", "jobs lost",
               "duplicate results", "other problems"]  # fmt: skip
    rows = [[r["scenario"], r["trials"], r["accepted"], r["completed"], r["lost"],
             r["duplicates"], r["problems"]] for r in totals.values()]  # fmt: skip
    print(table(headers, rows))
    print(f"results in {args.result_store}; {time.monotonic() - start:.0f}s in all; "
          f"load average {load_average()}")  # fmt: skip
    emit_json("faults", {"rows": list(totals.values()), "result_store": args.result_store})
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    bad = any(r["lost"] or r["duplicates"] or r["problems"] for r in totals.values())
    return 1 if bad else 0


def result_store_env(kind: str, root: Path) -> tuple[dict[str, str], SeaweedS3 | None]:
    """The LDMSERVE_/AWS_ variables for the chosen store (and the S3 server, started)."""
    if kind == "file":
        return {"LDMSERVE_RESULT_STORE": f"file://{(root / 'results').resolve()}"}, None
    if kind == "s3":
        s3 = SeaweedS3(root / "seaweedfs").start()
        env = {**s3.env, "LDMSERVE_RESULT_STORE": f"s3://{BUCKET}/faults",
               "LDMSERVE_S3_ENDPOINT_URL": s3.endpoint_url}  # fmt: skip
        return env, s3
    return {}, None


def run_groups(
    args: argparse.Namespace,
    names: list[str],
    trials: dict[str, int],
    root: Path,
    start: float,
    totals: dict[str, dict[str, Any]],
    store_env: dict[str, str],
) -> None:
    for group, (workers, env) in GROUPS.items():
        members = [n for n in names if SCENARIOS[n][0] == group]
        if not members:
            continue
        stack = Stack(root / group, workers=workers, env={**env, **store_env},
                      redis_config=args.redis_config)  # fmt: skip
        try:
            stack.start()
            for trial in range(max(trials[n] for n in members)):
                for name in members:
                    if trial >= trials[name] or time.monotonic() - start > args.budget_s:
                        continue
                    t0 = time.monotonic()
                    result = SCENARIOS[name][1](stack, args.seed + 1000 * trial + len(name))
                    row = totals.setdefault(name, {"scenario": result.scenario, "trials": 0,
                                                   "accepted": 0, "completed": 0, "lost": 0,
                                                   "duplicates": 0, "problems": 0})  # fmt: skip
                    row["trials"] += 1
                    for key in ("accepted", "completed", "lost", "duplicates"):
                        row[key] += getattr(result, key)
                    row["problems"] += len(result.problems)
                    print(f"{name} trial {trial}: {time.monotonic() - t0:.0f}s "
                          f"accepted {result.accepted} completed {result.completed} "
                          f"lost {result.lost} dup {result.duplicates} {result.notes}")  # fmt: skip
                    for problem in result.problems:
                        print(f"  problem: {problem[:400]}")
                    sys.stdout.flush()
        finally:
            stack.close()


if __name__ == "__main__":
    sys.exit(main())
