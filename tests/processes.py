"""Real ldmserve processes for end-to-end and fault tests: start on loopback, stop by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from service.queue.keys import Keys
from service.redis_server import RedisServer, free_port
from tests.queues import DEFAULT_KEYS

FAST_WORKER_ENV = {
    "LDMSERVE_HEARTBEAT_INTERVAL_S": "0.5",
    "LDMSERVE_WORKER_TTL_S": "3",
    "LDMSERVE_RECLAIM_AFTER_S": "2",
    "LDMSERVE_DRAIN_TIMEOUT_S": "30",
    "LDMSERVE_MAX_BATCH": "8",
    "LDMSERVE_LOG_LEVEL": "INFO",
    # Call sizing stays on, measured at 64x64 so that the many workers the suite starts
    # spend milliseconds, not seconds, measuring on a loaded 2-core machine.
    "LDMSERVE_CALL_SIZING_SIDE": "64",
}


def service_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDMSERVE_")}
    return {**env, **FAST_WORKER_ENV, "LDMSERVE_REDIS_URL": redis_url, **extra}


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
        )


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def api_process(redis_url: str, log: Path, **extra: str) -> Iterator[str]:
    """`ldmserve api` on a free port; yields its base URL."""
    port = free_port()
    proc = spawn(["api", "--port", str(port)], service_env(redis_url, **extra), log)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # died: stop waiting, fail below

    try:
        wait_until(healthy, 60, "the API")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield base
    finally:
        stop(proc)


@contextmanager
def model_stack(
    root: Path,
    models: Sequence[str],
    api_env: Mapping[str, str] | None = None,
    worker_env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """redis-server, `ldmserve api` and one worker per model source, all live; yields the
    API's base URL and stops everything after."""
    server = RedisServer(root / "redis").start()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        with api_process(server.url, root / "api.log", **(api_env or {})) as base:
            env = service_env(server.url, **(worker_env or {}))
            for i, model in enumerate(models):
                workers.append(spawn(["worker", "--model", model], env, root / f"worker{i}.log"))
            wait_until(lambda: live_workers(base) == len(models), 180, "live workers")
            yield base
    finally:
        for w in workers:
            stop(w)
        server.stop()


def live_workers(base: str) -> int:
    try:
        r = httpx.get(f"{base}/v1/models", timeout=2)
    except httpx.HTTPError:
        return 0
    return sum(m["workers"] for m in r.json()["models"]) if r.status_code == 200 else 0


# ---------------------------------------------------------------------------- fault tests

FAULT_WORKER = Path(__file__).resolve().parent / "fault_worker.py"


def spawn_script(
    script: Path, args: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """Like :func:`spawn`, for a test entry point such as tests/fault_worker.py."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
        )


class Stack:
    """redis-server + `ldmserve api` + workers, each killable and restartable by pid.

    The API keeps its port and Redis its port and data directory across restarts, so
    clients and workers can reconnect to the same addresses. Workers run through
    tests/fault_worker.py (a plain `ldmserve worker` unless a job asks for a fault).
    """

    def __init__(
        self,
        root: Path,
        *,
        workers: int = 2,
        appendfsync: str = "always",
        redis_config: Path | None = None,
        env: dict[str, str] | None = None,
        cluster_url: str | None = None,
    ) -> None:
        from service.redis_server import RedisServer

        self.root = root
        # cluster_url: use that (running) Redis Cluster instead of starting a redis-server.
        self.cluster_url = cluster_url
        self.n_workers = workers
        self.redis = RedisServer(root / "redis", appendfsync=appendfsync, config=redis_config)
        self.api_port = free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.extra_env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
        if cluster_url is not None:
            self.extra_env["LDMSERVE_REDIS_CLUSTER"] = "true"
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.exited: list[subprocess.Popen[bytes]] = []
        self._spawned = 0

    @property
    def redis_url(self) -> str:
        return self.cluster_url or self.redis.url

    @property
    def keys(self) -> Keys:
        """The key names the stack's processes use (hash-tagged on a cluster)."""
        return Keys.for_settings(DEFAULT_KEYS.prefix, cluster=self.cluster_url is not None)

    def redis_client(self) -> redis.Redis:
        """A synchronous client of the stack's Redis; on a cluster, of the node that holds
        ldmserve's one hash slot (every key the stack uses lives there)."""
        if self.cluster_url is None:
            return redis.Redis.from_url(self.redis.url, socket_timeout=5)
        with redis.Redis.from_url(self.cluster_url, socket_timeout=5) as probe:
            slot = int(probe.execute_command("CLUSTER", "KEYSLOT", self.keys.seq))
            ranges = probe.execute_command("CLUSTER", "SLOTS")
        host, port = next((p[0], p[1]) for start, end, p, *_ in ranges if start <= slot <= end)
        return redis.Redis(host=host.decode(), port=int(port), socket_timeout=5)

    @property
    def env(self) -> dict[str, str]:
        return service_env(self.redis_url, **self.extra_env)

    def start(self, timeout: float = 240) -> Stack:
        if self.cluster_url is None:
            self.redis.start()
        self.start_api()
        for _ in range(self.n_workers):
            self.start_worker()
        self.wait_workers(self.n_workers, timeout)
        return self

    def start_api(self, timeout: float = 60) -> None:
        self.api = spawn(["api", "--port", str(self.api_port)], self.env, self.root / "api.log")
        api = self.api

        def healthy() -> bool:
            if api.poll() is not None:
                raise RuntimeError((self.root / "api.log").read_text()[-3000:])
            try:
                return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout, "the API")

    def kill_api(self) -> None:
        if self.api is not None:
            stop(self.api, signal.SIGKILL)

    def start_worker(self, **extra: str) -> subprocess.Popen[bytes]:
        self._spawned += 1
        log = self.root / f"worker{self._spawned}.log"
        proc = spawn_script(FAULT_WORKER, ["worker", "--model", "demo"], {**self.env, **extra}, log)
        self.workers.append(proc)
        return proc

    def alive_workers(self) -> list[subprocess.Popen[bytes]]:
        for proc in list(self.workers):
            if proc.poll() is not None:
                self.workers.remove(proc)
                self.exited.append(proc)
        return self.workers

    def retire(self, proc: subprocess.Popen[bytes]) -> None:
        """Forget a worker the test stopped itself (so no supervisor restarts it twice)."""
        if proc in self.workers:
            self.workers.remove(proc)
            self.exited.append(proc)

    def worker_by_pid(self, pid: int) -> subprocess.Popen[bytes] | None:
        return next((w for w in self.workers if w.pid == pid), None)

    def wait_workers(self, n: int, timeout: float = 240) -> None:
        wait_until(lambda: live_workers(self.base) >= n, timeout, f"{n} live workers", 0.25)

    def worker_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("worker*.log")))

    def kill_redis(self) -> None:
        proc = self.redis.process
        if proc is not None:
            proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        self.redis.process = None

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.close()  # what did start (redis, an API, some workers) is stopped
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in self.workers:
            stop(proc, signal.SIGKILL, 10)
        if self.api is not None:
            stop(self.api, signal.SIGTERM, 10)
        if self.cluster_url is None:
            self.redis.stop()


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until the job ends; its final view."""
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in ("succeeded", "failed", "canceled"):
            return view
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {view}")
