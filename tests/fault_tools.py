"""What the fault scenarios (tests/fault_scenarios.py) are built from: the result record, an
HTTP client that rides through outages, the recorder of published status transitions, and the
checks that every accepted job completed exactly once with the right image.
"""

from __future__ import annotations

import io
import json
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import redis
from PIL import Image

from service.queue.keys import Keys
from tests.processes import Stack
from tests.queues import DEFAULT_KEYS

TERMINAL = ("succeeded", "failed", "canceled")
_LIBRARY: dict[str, Any] = {}


@dataclass
class FaultResult:
    scenario: str
    accepted: int = 0
    completed: int = 0
    lost: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def assert_nothing_lost(self) -> None:
        """Every accepted job completed exactly once, with no problem found on the way."""
        assert self.problems == [], self
        assert self.lost == 0 and self.duplicates == 0, self
        assert self.completed == self.accepted > 0, self


# ---------------------------------------------------------------------------- clients


class Api:
    """An HTTP client that rides through API and Redis outages (bounded retries)."""

    def __init__(self, base: str, retry_for: float = 90) -> None:
        self.http = httpx.Client(base_url=base, timeout=10)
        self.retry_for = retry_for
        self.retries = 0

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """Retry connection errors and 503 (Redis away) until ``retry_for`` runs out."""
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                r = self.http.request(method, url, **kw)
                if r.status_code != 503:
                    return r
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {url}: no answer for {self.retry_for}s")
            self.retries += 1
            time.sleep(0.2)

    def submit(self, body: dict[str, Any]) -> str:
        """POST with an Idempotency-Key, so a retry after a lost answer never duplicates."""
        key = uuid.uuid4().hex
        r = self.request("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
        if r.status_code != 202:
            raise AssertionError(f"submit answered {r.status_code}: {r.text}")
        return str(r.json()["id"])

    def view(self, job_id: str) -> dict[str, Any]:
        r = self.request("GET", f"/v1/jobs/{job_id}")
        if r.status_code != 200:
            raise AssertionError(f"GET job {job_id} answered {r.status_code}: {r.text}")
        return dict(r.json())

    def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Poll until every job is terminal or ``timeout`` passes; returns the last views."""
        views: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for job_id in ids:
                if views.get(job_id, {}).get("status") not in TERMINAL:
                    views[job_id] = self.view(job_id)
            if all(v["status"] in TERMINAL for v in views.values()) and len(views) == len(ids):
                break
            time.sleep(0.3)
        return views


class Transitions:
    """Records every status message the queue publishes (PSUBSCRIBE), reconnecting if
    Redis goes away (messages published meanwhile are missed, not invented)."""

    def __init__(self, url: str, keys: Keys = DEFAULT_KEYS) -> None:
        # A plain client of one node is enough on a cluster too: PUBLISH reaches every node.
        self.url, self.pattern = url, keys.events("*")
        self.statuses: dict[str, list[str]] = defaultdict(list)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Transitions:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
            try:
                pubsub = client.pubsub()
                pubsub.psubscribe(self.pattern)
                self._ready.set()
                while not self._stop.is_set():
                    msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                    if msg and msg["type"] == "pmessage":
                        data = json.loads(msg["data"])
                        if data.get("type") == "status":
                            self.statuses[data["id"]].append(data["status"])
                pubsub.close()
            except (redis.RedisError, OSError):
                time.sleep(0.2)
            finally:
                client.close()

    def count(self, job_id: str, status: str) -> int:
        return self.statuses.get(job_id, []).count(status)


# ---------------------------------------------------------------------------- checks


def library_images(body: dict[str, Any]) -> list[np.ndarray]:
    """The library's images for a request (``load_pipeline("demo").generate``), cached."""
    from model import load_pipeline

    if "pipe" not in _LIBRARY:
        _LIBRARY["pipe"] = load_pipeline("demo", device="cpu")
    key = json.dumps(body, sort_keys=True)
    if key not in _LIBRARY:
        params = {k: v for k, v in body.items() if k not in ("output_format", "model")}
        _LIBRARY[key] = [np.asarray(i.convert("RGB")) for i in _LIBRARY["pipe"].generate(**params)]
    return list(_LIBRARY[key])


def succeeded_in_logs(stack: Stack) -> Counter[str]:
    return Counter(re.findall(r"job ([0-9a-f]{32}) succeeded", stack.worker_logs()))


def check_jobs(
    stack: Stack,
    api: Api,
    jobs: dict[str, dict[str, Any]],
    views: dict[str, dict[str, Any]],
    result: FaultResult,
    transitions: Transitions | None = None,
    *,
    expect_failed: frozenset[str] = frozenset(),
    compare: bool = True,
) -> None:
    """Fill ``completed``, ``lost``, ``duplicates`` and ``problems`` for ``jobs`` (id → body)."""
    logged = succeeded_in_logs(stack)
    for job_id, body in jobs.items():
        view = views.get(job_id) or api.view(job_id)
        want = "failed" if job_id in expect_failed else "succeeded"
        if view["status"] != want:
            result.lost += 1
            result.problems.append(f"job {job_id} ended {view['status']!r}, not {want}: {view}")
            continue
        result.completed += 1
        dup = max(0, logged[job_id] - 1)
        if transitions is not None:
            dup = max(dup, transitions.count(job_id, "succeeded") - 1)
        if dup:
            result.duplicates += dup
            result.problems.append(f"job {job_id} finished {dup + 1} times")
        if want == "failed":
            continue
        if not 1 <= view["attempt"] <= stack_max_attempts(stack):
            result.problems.append(f"job {job_id}: attempt {view['attempt']}")
        images = view.get("images") or []
        if len(images) != body.get("num_images", 1):
            result.problems.append(f"job {job_id}: {len(images)} images of {body['num_images']}")
            continue
        expected = library_images(body) if compare else None
        for i, image in enumerate(images):
            r = api.request("GET", image["url"])
            if r.status_code != 200:
                result.problems.append(f"job {job_id} image {i}: {r.status_code}")
                continue
            got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
            if got.shape != (body["height"], body["width"], 3):
                result.problems.append(f"job {job_id} image {i}: shape {got.shape}")
            elif expected is not None and np.abs(got.astype(int) - expected[i]).max() > 2:
                result.problems.append(f"job {job_id} image {i} differs from the library")


def stack_max_attempts(stack: Stack) -> int:
    return int(stack.env.get("LDMSERVE_MAX_ATTEMPTS", "3"))


def redis_client(stack: Stack) -> redis.Redis:
    return stack.redis_client()


def jobs_succeeded_metric(stack: Stack) -> int:
    client = redis_client(stack)
    try:
        return int(client.hget(stack.keys.metrics, "jobs_succeeded") or 0)
    finally:
        client.close()


def request_body(rng: random.Random, i: int, prompt_prefix: str = "") -> dict[str, Any]:
    return {
        "prompt": prompt_prefix + rng.choice(["a red fox", "a castle at dusk", "rain on glass"]),
        "width": 64,
        "height": rng.choice([64, 72]),
        "steps": rng.randint(4, 8),
        "guidance_scale": rng.choice([1.0, 7.5]),
        "sampler": rng.choice(["ddim", "euler", "euler_a", "dpmpp_2m", "heun"]),
        "seed": rng.randint(0, 10_000) + i,
        "num_images": rng.choice([1, 1, 2]),
    }


def job_worker(stack: Stack, job_id: str) -> str | None:
    """The worker id a job's record names (the API does not show it)."""
    client = redis_client(stack)
    try:
        raw = client.hget(stack.keys.job(job_id), "worker")
    finally:
        client.close()
    return raw.decode() if raw else None


def worker_pid(worker: str | None) -> int | None:
    """Worker ids are ``host-pid-random``."""
    parts = (worker or "").rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def running_on(stack: Stack, api: Api, ids: list[str]) -> dict[int, list[str]]:
    """pid → ids of the given jobs running (at least one step done) on it."""
    out: dict[int, list[str]] = defaultdict(list)
    for job_id in ids:
        view = api.view(job_id)
        if view["status"] == "running" and (view.get("progress") or {}).get("step", 0):
            pid = worker_pid(job_worker(stack, job_id))
            if pid:
                out[pid].append(job_id)
    return out


def wait_running(stack: Stack, api: Api, ids: list[str], timeout: float) -> dict[int, list[str]]:
    """Wait until one of ``ids`` is mid-denoise; returns :func:`running_on`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holders = running_on(stack, api, ids)
        if holders:
            return holders
        time.sleep(0.1)
    raise TimeoutError(f"no job of {len(ids)} mid-denoise within {timeout}s")


def live_count(stack: Stack) -> int:
    from tests.processes import live_workers

    return live_workers(stack.base)


class Submitter(threading.Thread):
    """Submits ``n`` jobs, one every ``gap_s``, retrying through outages (Idempotency-Key)."""

    def __init__(self, base: str, bodies: list[dict[str, Any]], gap_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.api = Api(base, retry_for=120)
        self.bodies, self.gap_s = bodies, gap_s
        self.accepted: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            for body in self.bodies:
                self.accepted[self.api.submit(body)] = body
                time.sleep(self.gap_s)
        except Exception as exc:  # reported by the scenario
            self.errors.append(repr(exc))
        finally:
            self.api.close()


def metric(stack: Stack, name: str) -> int:
    client = redis_client(stack)
    try:
        return int(float(client.hget(stack.keys.metrics, name) or 0))
    finally:
        client.close()


def wait_keys_gone(client: redis.Redis, keys: Keys, timeout: float) -> int:
    """Wait until no job or idempotency key is left (KEYS expires lazily); returns the count."""
    deadline = time.monotonic() + timeout
    while True:
        left = len(client.keys(keys.pattern("job"))) + len(client.keys(keys.pattern("idem")))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
