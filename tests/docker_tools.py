"""Docker helpers for tests/test_docker.py: the CLI, container health, compose on this host.

Everything runs with host networking on loopback (no bridge network is ever created) and
every container and compose project gets a unique name, removed afterwards.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import time
import uuid
from typing import Any

ROLES = ("api", "worker")


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI; a failure shows the command and its output."""
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} -> {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def state(container: str) -> dict[str, Any]:
    return json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)


def logs(container: str) -> str:
    result = docker("logs", "--tail", "60", container, check=False)
    return f"--- {container} logs ---\n{result.stdout}{result.stderr}"


def wait_healthy(container: str, timeout: float) -> None:
    """Until Docker reports the container's HEALTHCHECK healthy; fails at once if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = state(container)
        if not now["Running"]:
            raise AssertionError(f"{container} exited ({now['ExitCode']})\n{logs(container)}")
        if now.get("Health", {}).get("Status") == "healthy":
            return
        time.sleep(0.5)
    raise AssertionError(f"{container} not healthy after {timeout}s: {now}\n{logs(container)}")


def wait_exit(container: str, timeout: float) -> int:
    """`docker wait` with a deadline: the container's exit code."""
    return int(docker("wait", container, timeout=timeout).stdout.strip())


def remove(*containers: str) -> None:
    for name in containers:
        docker("rm", "-f", "-v", name, check=False)


def process_uid(container: str) -> int:
    """The real uid of the container's main process (PID 1), not just the image's USER."""
    status = docker("exec", container, "cat", "/proc/1/status").stdout
    (line,) = [s for s in status.splitlines() if s.startswith("Uid:")]
    return int(line.split()[1])


def compose_command() -> list[str]:
    """The compose plugin when the CLI has it, else Debian's docker-compose (v1)."""
    if docker("compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    found = shutil.which("docker-compose")
    assert found, "neither `docker compose` nor docker-compose is installed"
    return [found]


def local_compose(
    shipped: dict[str, Any], *, image: str, redis_image: str, redis_port: int, api_port: int
) -> dict[str, Any]:
    """The shipped compose file made to run on a host without GPU, registry or bridge network.

    Changed, and only this: every service on the host network (so no published ports; Redis
    bound to loopback on a free port, the API on another), the locally built images instead of
    `build:` and redis:7.4-alpine, the worker on the CPU without its GPU reservation. Commands,
    settings, health checks, volumes, redis.conf, restart policies and grace periods stay.
    """
    out = copy.deepcopy(shipped)
    services = out["services"]
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    for service in services.values():
        service["network_mode"] = "host"
        service.pop("ports", None)
    redis = services["redis"]
    redis["image"] = redis_image
    redis["command"] = [*redis["command"], "--port", str(redis_port), "--bind", "127.0.0.1"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    redis["healthcheck"]["test"] = ["CMD", "redis-cli", "-p", str(redis_port), "ping"]
    for role in ROLES:
        service = services[role]
        service.pop("build")
        service["image"] = image
        service["environment"] = {
            **service["environment"],
            "LDMSERVE_REDIS_URL": redis_url,
            "LDMSERVE_HOST": "127.0.0.1",
        }
    api = services["api"]
    at = api["command"].index("--port")
    api["command"][at + 1] = str(api_port)
    worker = services["worker"]
    at = worker["command"].index("--device")
    worker["command"][at + 1] = "cpu"
    worker.pop("deploy")  # the nvidia device reservation
    return out
