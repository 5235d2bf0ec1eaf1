"""Fault scenarios shared by tests/test_faults_*.py and bench/faults.py.

Each scenario runs against a live :class:`tests.processes.Stack` (real redis-server, API and
workers on loopback), injects one fault, waits (bounded) for every accepted job and returns
a :class:`FaultResult`: jobs accepted (202), completed (reached the state they must reach),
lost (accepted but never completed), duplicate results (a job finished more than once), and
``problems``: every other broken expectation, in words. Tests assert ``problems == []``;
the benchmark prints the counts. Building blocks live in :mod:`tests.fault_tools`.

"Exactly once" is checked three ways: the job record (status, attempt counter), the
status messages the queue publishes for each job (recorded by :class:`Transitions`), and
the workers' logs (each stored result logs ``job <id> succeeded`` once).
"""

from __future__ import annotations

import random
import signal
import time
from typing import Any

import httpx

from service.queue.keys import GROUP
from tests.fault_tools import (
    TERMINAL,
    Api,
    FaultResult,
    Submitter,
    Transitions,
    check_jobs,
    job_worker,
    jobs_succeeded_metric,
    live_count,
    metric,
    redis_client,
    request_body,
    running_on,
    stack_max_attempts,
    succeeded_in_logs,
    wait_keys_gone,
    wait_running,
)
from tests.processes import Stack

# ---------------------------------------------------------------------------- scenarios


def worker_kill(stack: Stack, seed: int, rounds: int = 3, per_round: int = 6) -> FaultResult:
    """SIGKILL a worker mid-denoise at a random moment, ``rounds`` times, restarting one after
    each kill; the other worker reclaims its jobs once the heartbeat expired."""
    rng = random.Random(seed)
    result = FaultResult("worker SIGKILL mid-denoise")
    before = jobs_succeeded_metric(stack)
    api = Api(stack.base)
    jobs: dict[str, dict[str, Any]] = {}
    killed = 0
    try:
        with Transitions(stack.redis_url, stack.keys) as transitions:
            for r in range(rounds):
                stack.wait_workers(2)  # the victim's replacement may still be loading
                # "slow:" jobs sleep FAULT_SLOW_STEP_S per UNet call: a few seconds of denoising at any load.
                bodies = [request_body(rng, r * 100 + i, "slow:") for i in range(per_round)]
                ids = [api.submit(b) for b in bodies]
                result.accepted += len(ids)
                jobs.update(zip(ids, bodies, strict=True))
                holders = wait_running(stack, api, ids, 90)
                time.sleep(rng.uniform(0.0, 1.0))
                pid = max(holders, key=lambda p: len(holders[p]))
                victim = stack.worker_by_pid(pid)
                if victim is None:
                    result.problems.append(f"round {r}: no worker process with pid {pid}")
                    continue
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
                stack.retire(victim)
                killed += 1
                stack.start_worker()
                views = api.wait_terminal(ids, 240)
                if not all(v["status"] in TERMINAL for v in views.values()):
                    result.problems.append(f"round {r}: jobs still open after 240 s")
            time.sleep(0.5)  # let the last status messages arrive
            views = {j: api.view(j) for j in jobs}
            check_jobs(stack, api, jobs, views, result, transitions)
            reclaimed = [j for j, v in views.items() if v["attempt"] > 1]
            result.notes.update(kills=killed, reclaimed=len(reclaimed))
            if not reclaimed:
                result.problems.append("no job was reclaimed: the kills hit no running job")
            for job_id in reclaimed:
                if transitions.count(job_id, "running") < 2:
                    result.problems.append(f"job {job_id}: attempt>1 without a second run")
        after = jobs_succeeded_metric(stack)
        if after - before != result.completed:
            result.duplicates += max(0, after - before - result.completed)
            result.problems.append(
                f"jobs_succeeded grew by {after - before}, {result.completed} jobs"
            )
    finally:
        api.close()
    return result


def slow_worker(stack: Stack, seed: int, steps: int = 20) -> FaultResult:
    """A job whose UNet calls take ``step_s`` each (far longer than reclaim_after_s) stays
    with its worker while the other worker is live and idle: heartbeats decide, not time."""
    rng = random.Random(seed)
    result = FaultResult("slow but alive worker")
    reclaim_after = float(stack.env["LDMSERVE_RECLAIM_AFTER_S"])
    api = Api(stack.base)
    try:
        stack.wait_workers(2)
        body = request_body(rng, 0, "slow:") | {"steps": steps, "sampler": "euler",
                                                "num_images": 1}  # fmt: skip
        job_id = api.submit(body)
        result.accepted = 1
        owners: set[str] = set()
        started = time.monotonic()
        views: dict[str, dict[str, Any]] = {}
        deadline = started + 60 + steps * float(stack.env["FAULT_SLOW_STEP_S"]) * 3
        while time.monotonic() < deadline:
            view = api.view(job_id)
            owner = job_worker(stack, job_id)
            if owner:
                owners.add(owner)
            if view["status"] in TERMINAL:
                views[job_id] = view
                break
            time.sleep(0.2)
        took = time.monotonic() - started
        result.notes.update(job_s=round(took, 1), reclaim_after_s=reclaim_after)
        check_jobs(stack, api, {job_id: body}, views, result, compare=True)
        view = views.get(job_id) or api.view(job_id)
        if took < 3 * reclaim_after:
            result.problems.append(f"the job took {took:.1f}s: not longer than reclaim_after_s")
        if view["attempt"] != 1 or len(owners) != 1:
            result.problems.append(f"robbed: attempt {view['attempt']}, owners {owners}")
        if live_count(stack) < 2:
            result.problems.append("the second worker was not live throughout")
    finally:
        api.close()
    return result


def drain_hand_back(stack: Stack, seed: int) -> FaultResult:
    """SIGTERM a worker whose running job outlasts the drain timeout: the job is handed
    back (status queued, the run not counted) and another worker completes it, attempt 1."""
    rng = random.Random(seed)
    result = FaultResult("worker SIGTERM, drain timeout < job")
    api = Api(stack.base)
    try:
        with Transitions(stack.redis_url, stack.keys) as transitions:
            stack.wait_workers(2)
            body = request_body(rng, 0, "slow:") | {"steps": 12, "num_images": 1}
            job_id = api.submit(body)
            result.accepted = 1
            holders = wait_running(stack, api, [job_id], 90)
            first = job_worker(stack, job_id)
            pid = next(iter(holders))
            victim = stack.worker_by_pid(pid)
            assert victim is not None
            victim.send_signal(signal.SIGTERM)
            code = victim.wait(60)
            stack.retire(victim)
            stack.start_worker()
            views = api.wait_terminal([job_id], 120)
            time.sleep(0.5)
            check_jobs(stack, api, {job_id: body}, views, result, transitions)
            view = views[job_id]
            if code != 0:
                result.problems.append(f"the draining worker exited {code}")
            if job_worker(stack, job_id) == first:
                result.problems.append("the drained worker itself finished the job")
            if view["attempt"] != 1:
                result.problems.append(f"handed-back job ended on attempt {view['attempt']}")
            seen = transitions.statuses.get(job_id, [])
            if seen[-4:] != ["running", "queued", "running", "succeeded"]:
                result.problems.append(f"status transitions {seen}")
            result.notes["transitions"] = seen
    finally:
        api.close()
    return result


def poison_job(stack: Stack, seed: int, others: int = 4, max_restarts: int = 8) -> FaultResult:
    """A job that kills every worker that receives it fails after max_attempts with a clear
    error; jobs submitted around it succeed. A supervisor loop restarts crashed workers."""
    rng = random.Random(seed)
    result = FaultResult("poison job (crashes its worker)")
    max_attempts = stack_max_attempts(stack)
    api = Api(stack.base)
    restarts = 0
    try:
        with Transitions(stack.redis_url, stack.keys) as transitions:
            stack.wait_workers(2)
            bodies = [request_body(rng, i) for i in range(others)]
            before = [api.submit(b) for b in bodies[: others // 2]]
            poison = api.submit({"prompt": "poison", "width": 64, "height": 64, "steps": 4})
            after = [api.submit(b) for b in bodies[others // 2 :]]
            jobs: dict[str, dict[str, Any]] = dict(zip([*before, *after], bodies, strict=True))
            jobs[poison] = {}
            result.accepted = len(jobs)
            deadline = time.monotonic() + 120 + 45 * max_attempts
            while time.monotonic() < deadline:
                for proc in list(stack.workers):
                    if proc.poll() is not None and restarts < max_restarts:
                        stack.retire(proc)
                        restarts += 1
                        stack.start_worker()
                views = {j: api.view(j) for j in jobs}
                if all(v["status"] in TERMINAL for v in views.values()):
                    break
                time.sleep(0.5)
            check_jobs(stack, api, jobs, views, result, transitions,
                       expect_failed=frozenset({poison}))  # fmt: skip
            pv = views[poison]
            err = pv.get("error") or {}
            result.notes.update(restarts=restarts, poison_attempts=pv["attempt"],
                                error=err.get("message"),
                                others_attempts=[views[j]["attempt"] for j in [*before, *after]])  # fmt: skip
            if pv["status"] != "failed" or pv["attempt"] != max_attempts:
                result.problems.append(f"poison job: {pv['status']} on attempt {pv['attempt']}")
            if "max_attempts" not in (err.get("code") or "") or str(max_attempts) not in (
                err.get("message") or ""
            ):
                result.problems.append(f"poison job error not clear: {err}")
        # leave the stack as found: wait for the restarted workers
        for proc in list(stack.workers):
            if proc.poll() is not None:
                stack.retire(proc)
                stack.start_worker()
    finally:
        api.close()
    return result


def api_restart(stack: Stack, seed: int, n: int = 16) -> FaultResult:
    """SIGKILL the API under load and start it again on the same port: every 202-accepted
    job completes; clients retry (POST with an Idempotency-Key, so no retry duplicates)."""
    rng = random.Random(seed)
    result = FaultResult("API SIGKILL + restart under load")
    submitted_before = metric(stack, "jobs_submitted")
    api = Api(stack.base)
    try:
        with Transitions(stack.redis_url, stack.keys) as transitions:
            stack.wait_workers(stack.n_workers)
            submitter = Submitter(stack.base, [request_body(rng, i) for i in range(n)])
            submitter.start()
            deadline = time.monotonic() + 60
            while len(submitter.accepted) < n // 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            stack.kill_api()
            time.sleep(rng.uniform(0.2, 1.0))
            stack.start_api()
            submitter.join(180)
            result.problems += submitter.errors
            jobs = dict(submitter.accepted)
            result.accepted = len(jobs)
            views = api.wait_terminal(list(jobs), 240)
            time.sleep(0.5)
            check_jobs(stack, api, jobs, views, result, transitions, compare=False)
        created = metric(stack, "jobs_submitted") - submitted_before
        result.notes.update(client_retries=submitter.api.retries, jobs_created=created)
        if created != len(jobs):
            result.problems.append(f"{created} jobs created for {len(jobs)} accepted")
    finally:
        api.close()
    return result


def redis_restart(
    stack: Stack, seed: int, n: int = 12, down_s: float = 3.0, fsync_window_s: float = 0.0
) -> FaultResult:
    """SIGKILL redis-server under load (AOF, appendfsync as the stack chose), probe the API
    while it is away (503 + Retry-After for submit and GET, /readyz 503, /healthz 200),
    start it again on the same port and data dir: accepted jobs complete, and the API and
    workers reconnect by themselves (same pids, no restart).

    ``fsync_window_s`` > 0 (appendfsync everysec: a crash may lose the last second of
    writes, as deploy/redis.conf says): every submit is accepted first, and the kill comes
    that long after the last one, while jobs still run; then every accepted job must survive."""
    rng = random.Random(seed)
    result = FaultResult(f"Redis SIGKILL + restart (appendfsync {stack.redis.appendfsync})")
    api = Api(stack.base)
    try:
        with Transitions(stack.redis_url, stack.keys) as transitions:
            stack.wait_workers(stack.n_workers)
            pids = {p.pid for p in [stack.api, *stack.workers] if p is not None}
            bodies = [request_body(rng, i, "slow:") for i in range(n)]
            submitter = Submitter(stack.base, bodies, gap_s=0.15)
            submitter.start()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                ids = list(submitter.accepted)
                if len(ids) >= n // 3 and running_on(stack, api, ids):
                    break
                time.sleep(0.1)
            if fsync_window_s > 0:
                submitter.join(120)
                time.sleep(fsync_window_s)
            time.sleep(rng.uniform(0.0, 0.5))
            stack.kill_redis()
            some_id = next(iter(submitter.accepted))
            probes = {
                "submit": ("POST", "/v1/jobs", {"json": request_body(rng, 999)}),
                "get": ("GET", f"/v1/jobs/{some_id}", {}),
                "readyz": ("GET", "/readyz", {}),
            }
            for name, (method, url, kw) in probes.items():
                try:
                    r = httpx.request(method, stack.base + url, timeout=10, **kw)
                except httpx.HTTPError as exc:
                    result.problems.append(f"{name} while Redis is down: {exc!r}")
                    continue
                result.notes[f"{name}_down"] = r.status_code
                if r.status_code != 503 or "retry-after" not in r.headers:
                    result.problems.append(
                        f"{name} while Redis is down: {r.status_code} {dict(r.headers)} {r.text}"
                    )
            r = httpx.get(stack.base + "/healthz", timeout=10)
            if r.status_code != 200:
                result.problems.append(f"/healthz while Redis is down: {r.status_code}")
            time.sleep(down_s)
            stack.redis.start()
            submitter.join(180)
            result.problems += submitter.errors
            jobs = dict(submitter.accepted)
            result.accepted = len(jobs)
            views = api.wait_terminal(list(jobs), 240)
            r = httpx.get(stack.base + "/readyz", timeout=10)
            if r.status_code != 200:
                result.problems.append(f"/readyz after the restart: {r.status_code} {r.text}")
            time.sleep(0.5)
            check_jobs(stack, api, jobs, views, result, transitions, compare=False)
            now = {p.pid for p in [stack.api, *stack.workers] if p is not None and p.poll() is None}
            if now != pids:
                result.problems.append(f"processes restarted or died: {pids} -> {now}")
            result.notes["reclaimed"] = sum(v["attempt"] > 1 for v in views.values())
    finally:
        api.close()
    return result


def ttl_and_memory(stack: Stack, seed: int, n: int = 200) -> FaultResult:
    """Results past their TTL answer 410 (never 5xx), then the job 404; ``n`` tiny jobs leave
    Redis as they found it: stream length 0, every job key with a TTL and gone after it,
    used_memory back within 256 kB of the start. Needs LDMSERVE_RESULT_TTL_S=2 and
    LDMSERVE_JOB_TTL_GRACE_S=3 in the stack's env."""
    rng = random.Random(seed)
    result = FaultResult("results past TTL; memory over a long run")
    result_ttl = float(stack.env["LDMSERVE_RESULT_TTL_S"])
    grace = float(stack.env["LDMSERVE_JOB_TTL_GRACE_S"])
    client = redis_client(stack)
    api = Api(stack.base)
    tiny = {"width": 64, "height": 64, "steps": 1, "guidance_scale": 1.0, "sampler": "euler"}
    try:
        stack.wait_workers(stack.n_workers)
        # 410 after the result TTL, while the record lives; then 404.
        job_id = api.submit({"prompt": "expire me", **tiny})
        view = api.wait_terminal([job_id], 120)[job_id]
        result.accepted += 1
        result.completed += view["status"] == "succeeded"
        codes: list[int] = []
        deadline = time.monotonic() + result_ttl + grace + 30
        while time.monotonic() < deadline:
            img = api.request("GET", f"/v1/jobs/{job_id}/images/0").status_code
            job = api.request("GET", f"/v1/jobs/{job_id}").status_code
            codes.append(img)
            if img >= 500 or job >= 500:
                result.problems.append(f"5xx after expiry: image {img}, job {job}")
                break
            if job == 404:
                break
            if img == 410 and job != 200:
                result.problems.append(f"image 410 but job {job}")
            time.sleep(0.1)
        seen = sorted(set(codes))
        result.notes["image_codes"] = seen
        if 410 not in seen or not set(seen) <= {200, 410, 404}:
            result.problems.append(f"image answers over time: {seen} (want 200 → 410)")
        wait_keys_gone(client, stack.keys, 30)
        before = int(client.info("memory")["used_memory"])
        # A long-ish run of tiny jobs.
        bodies = [{"prompt": f"tiny {i}", "seed": rng.randint(0, 1 << 30), **tiny}
                  for i in range(n)]  # fmt: skip
        submitters = [Submitter(stack.base, bodies[k::4], gap_s=0.0) for k in range(4)]
        for s in submitters:
            s.start()
        max_len = 0
        while any(s.is_alive() for s in submitters):
            max_len = max(max_len, int(client.xlen(stack.keys.stream("demo"))))
            time.sleep(0.2)
        jobs = {j: b for s in submitters for j, b in s.accepted.items()}
        result.problems += [e for s in submitters for e in s.errors]
        result.accepted += len(jobs)
        views = api.wait_terminal(list(jobs), 300)
        done = [j for j, v in views.items() if v["status"] == "succeeded"]
        result.completed += len(done)
        result.lost += len(jobs) - len(done)
        logged = succeeded_in_logs(stack)
        result.duplicates += sum(max(0, logged[j] - 1) for j in jobs)
        stream_len = int(client.xlen(stack.keys.stream("demo")))
        pending = client.xpending(stack.keys.stream("demo"), GROUP)["pending"]
        no_ttl = [
            k
            for k in client.scan_iter(stack.keys.pattern("job"), count=1000)
            if client.ttl(k) == -1
        ]
        no_ttl += [
            k
            for k in client.scan_iter(stack.keys.pattern("idem"), count=1000)
            if client.ttl(k) == -1
        ]
        left = wait_keys_gone(client, stack.keys, result_ttl + grace + 30)
        after = int(client.info("memory")["used_memory"])
        result.notes.update(max_stream_len=max_len, stream_len=stream_len, pending=pending,
                            used_memory_before=before, used_memory_after=after)  # fmt: skip
        if stream_len or pending:
            result.problems.append(f"stream not trimmed: length {stream_len}, pending {pending}")
        if no_ttl:
            result.problems.append(f"{len(no_ttl)} job keys without a TTL, e.g. {no_ttl[:3]}")
        if left:
            result.problems.append(f"{left} job keys still there after their TTL")
        if after - before > 256 * 1024:
            result.problems.append(f"used_memory grew by {after - before} bytes over the run")
    finally:
        api.close()
        client.close()
    return result
