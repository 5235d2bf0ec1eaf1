"""The image built by `make image` and run: both roles, the HEALTHCHECK, drain, compose, AOF.

Needs a Docker engine (`bash scripts/start_docker.sh` installs and starts one; `.ci/run` does).
Marked `docker` and left out of the default `make test`; run with `make test-docker`. Without an
engine these tests fail, never skip. Containers use host networking on loopback only.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from PIL import Image

from model import load_pipeline
from service.redis_server import free_port
from tests.docker_tools import (
    compose_command,
    docker,
    local_compose,
    process_uid,
    remove,
    state,
    unique,
    wait_exit,
    wait_healthy,
)
from tests.processes import wait_job, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE = "ldmserve:latest"
LOCAL_BASE = "ldmserve-base:bookworm"
REDIS_IMAGE = "ldmserve-redis:bookworm"
SIZE_LIMIT = 2.5e9  # bytes, the CPU image
JOB = {"prompt": "a lighthouse in a container", "width": 64, "height": 64, "steps": 4, "seed": 7}
# Long enough (tens of UNet calls) to be still running when the worker gets SIGTERM.
LONG_JOB = {"prompt": "drain me", "width": 128, "height": 128, "steps": 60, "seed": 3}


def legacy_builder_env() -> dict[str, str]:
    """As scripts/build_image.sh: the legacy builder when the buildx plugin is missing."""
    if "DOCKER_BUILDKIT" in os.environ or docker("buildx", "version", check=False).returncode == 0:
        return dict(os.environ)
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


@pytest.fixture(scope="module")
def image() -> str:
    """`make image` on the local Debian base with CPU torch (seconds when cached)."""
    info = docker("info", check=False)
    assert info.returncode == 0, (
        f"no Docker engine ({info.stderr.strip()}): run `bash scripts/start_docker.sh` first"
    )
    result = subprocess.run(
        ["make", "image"],
        cwd=ROOT,
        env={**os.environ, "IMAGE_BASE": "local", "IMAGE": IMAGE},
        capture_output=True,
        text=True,
        timeout=3000,
        check=False,
    )
    assert result.returncode == 0, f"make image failed:\n{result.stdout[-6000:]}{result.stderr}"
    return IMAGE


@pytest.fixture(scope="module")
def redis_image(image: str) -> str:
    """Debian's redis-server on the same local base, for the compose run (no redis:7.4 pull)."""
    docker(
        "build", "--network", "host", "--build-arg", f"BASE_IMAGE={LOCAL_BASE}",
        "-t", REDIS_IMAGE, "-f", str(ROOT / "tests/docker/redis.Dockerfile"),
        str(ROOT / "tests/docker"),
        timeout=900,
    )  # fmt: skip
    return REDIS_IMAGE


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def serve_one(client: httpx.Client) -> tuple[str, bytes]:
    """Submit JOB (202), wait until it succeeded, return its id and PNG bytes."""
    r = client.post("/v1/jobs", json=JOB)
    assert r.status_code == 202, r.text
    view = wait_job(client, r.json()["id"])
    assert view["status"] == "succeeded", view
    png = client.get(view["images"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    return view["id"], png.content


# ---------------------------------------------------------------------------- the image


def test_image_is_small_non_root_and_free_of_test_dependencies(image: str) -> None:
    config = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", image).stdout)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["ldmserve"] and config["Cmd"] == ["api"]
    assert config["Healthcheck"]["Test"] == ["CMD", "ldmserve", "health", "api"]
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    assert size < SIZE_LIMIT, f"{image} is {size / 1e9:.2f} GB"

    probe = (
        "import importlib.metadata as m, importlib.util as u, json, torch; "
        "print(json.dumps({'dists': sorted({d.metadata['Name'].lower().replace('_', '-') "
        "for d in m.distributions()}), 'tests': u.find_spec('tests') is not None, "
        "'torch': torch.__version__}))"
    )
    found = json.loads(docker("run", "--rm", "--entrypoint", "python", image, "-c", probe).stdout)
    assert found["torch"] == "2.13.0+cpu" and not found["tests"]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {name: {Requirement(r).name.lower() for r in reqs} for name, reqs in extra.items()}
    # The image installs the s3 extra (boto3: results in object storage), which the tests
    # need too; pyyaml is also a runtime dependency of transformers and huggingface_hub.
    test_only = names["test"] - names["s3"] - {"pyyaml"}
    assert "boto3" in found["dists"], "the image has the s3 extra"
    assert test_only and not test_only & set(found["dists"]), test_only & set(found["dists"])


# ---------------------------------------------------------------------------- docker run


@pytest.fixture
def containers() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    remove(*names)


def test_api_and_worker_containers_serve_a_job_and_the_worker_drains(
    image: str, redis_url: str, containers: list[str]
) -> None:
    """`docker run ... api --port P` and `... worker --model demo --device cpu` on one Redis."""
    port = free_port()
    api, worker = unique("ldmserve-test-api"), unique("ldmserve-test-worker")
    containers += [api, worker]
    common = ["run", "-d", "--network", "host", "-e", f"LDMSERVE_REDIS_URL={redis_url}"]
    # The image's own HEALTHCHECK (`ldmserve health api`), probed every second instead of 30 s.
    docker(*common, "--name", api, "-e", "LDMSERVE_HOST=127.0.0.1", "--health-interval", "1s",
           image, "api", "--port", str(port))  # fmt: skip
    # A worker's check is `ldmserve health worker`, as in compose and k8s.
    docker(*common, "--name", worker, "-e", "LDMSERVE_HEARTBEAT_INTERVAL_S=1",
           "-e", "LDMSERVE_DRAIN_TIMEOUT_S=120", "--stop-timeout", "150",
           "--health-cmd", "ldmserve health worker", "--health-interval", "1s",
           image, "worker", "--model", "demo", "--device", "cpu")  # fmt: skip
    wait_healthy(api, 60)
    wait_healthy(worker, 300)
    assert process_uid(api) == process_uid(worker) == 10001
    for name, role in ((api, "api"), (worker, "worker")):
        assert docker("exec", name, "ldmserve", "health", role, check=False).returncode == 0

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        _, png = serve_one(client)
        expected = load_pipeline("demo").generate(**JOB)[0]
        assert np.array_equal(pixels(png), np.asarray(expected.convert("RGB")))

        job = client.post("/v1/jobs", json=LONG_JOB).json()["id"]

        def step() -> int:
            view = client.get(f"/v1/jobs/{job}").json()
            assert view["status"] in ("queued", "running"), view
            return (view["progress"] or {}).get("step", 0)

        wait_until(lambda: step() > 0, 120, "the long job to run", interval=0.1)
        docker("kill", "--signal", "TERM", worker)
        assert step() < LONG_JOB["steps"], "the job finished before SIGTERM: make it longer"
        assert wait_exit(worker, 200) == 0, "a draining worker exits 0"
        # The only worker is gone: the job succeeded only if it was finished while draining.
        view = client.get(f"/v1/jobs/{job}").json()
        assert view["status"] == "succeeded", view
    log = docker("logs", worker).stderr
    assert "draining 1 running jobs" in log and "handed back" not in log, log[-3000:]


# ---------------------------------------------------------------------------- compose


def test_compose_up_serves_jobs_and_redis_keeps_them_across_restarts(
    image: str, redis_image: str, tmp_path: Path
) -> None:
    """The shipped compose file (made local: see tests/docker_tools.local_compose)."""
    shipped = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    redis_port, api_port = free_port(), free_port()
    spec = local_compose(
        shipped, image=image, redis_image=redis_image, redis_port=redis_port, api_port=api_port
    )
    file = tmp_path / "docker-compose.yml"
    file.write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "models").mkdir()
    project = unique("ldmserve-test")
    # Relative paths (./redis.conf) resolve against deploy/, as for the shipped file.
    base = [*compose_command(), "-p", project, "--project-directory", str(DEPLOY), "-f", str(file)]
    env = {**os.environ, "MODELS_DIR": str(tmp_path / "models")}

    def compose(*args: str, timeout: float = 300, check: bool = True) -> str:
        result = subprocess.run(
            [*base, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert not check or result.returncode == 0, (
            f"compose {args}: {result.stdout}{result.stderr}"
        )
        return result.stdout

    def container(service: str) -> str:
        return compose("ps", "-q", service).strip()

    try:
        compose("up", "-d")
        redis, worker = container("redis"), container("worker")
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:

            def ready() -> bool:
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, 300, "the compose API to see a live worker", interval=0.5)
            first, png = serve_one(client)
            assert docker("exec", worker, "ldmserve", "health", "worker").returncode == 0

            compose("restart", "redis")  # SIGTERM: Redis writes the AOF out and exits
            wait_healthy(redis, 60)
            again = client.get(f"/v1/jobs/{first}").json()
            assert again["status"] == "succeeded", again
            assert client.get(again["images"][0]["url"]).content == png
            wait_until(ready, 120, "the worker to reconnect", interval=0.5)
            second, _ = serve_one(client)

            # A Redis process crash (SIGKILL): accepted jobs are in the AOF already (everysec
            # loses up to a second only on power loss or a kernel crash; see deploy/README.md).
            queued = client.post("/v1/jobs", json={**JOB, "seed": 8})
            assert queued.status_code == 202
            docker("kill", "--signal", "KILL", redis)
            wait_until(lambda: not state(redis)["Running"], 30, "redis to die", interval=0.2)
            compose("start", "redis")
            wait_healthy(redis, 60)
            for job in (first, second, queued.json()["id"]):
                view = wait_job(client, job)
                assert view["status"] == "succeeded", view

        compose("stop", timeout=200)  # the worker drains (stop_grace_period 90 s) and exits 0
        assert state(worker)["ExitCode"] == 0
    finally:
        compose("down", "-v", "--remove-orphans", check=False)
