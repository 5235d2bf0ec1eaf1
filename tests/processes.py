"""Real ldmserve processes for end-to-end and fault tests: start on loopback, stop by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.redis_server import free_port

FAST_WORKER_ENV = {
    "LDMSERVE_HEARTBEAT_INTERVAL_S": "0.5",
    "LDMSERVE_WORKER_TTL_S": "3",
    "LDMSERVE_RECLAIM_AFTER_S": "2",
    "LDMSERVE_DRAIN_TIMEOUT_S": "30",
    "LDMSERVE_MAX_BATCH": "8",
    "LDMSERVE_LOG_LEVEL": "INFO",
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


def live_workers(base: str) -> int:
    try:
        r = httpx.get(f"{base}/v1/models", timeout=2)
    except httpx.HTTPError:
        return 0
    return sum(m["workers"] for m in r.json()["models"]) if r.status_code == 200 else 0
