"""The CLI: `ldmserve up` serves a job and keeps its data across runs; generate; health; flags."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.cli import build_parser, settings_from
from service.redis_server import free_port
from tests.processes import stop, wait_until

LDMSERVE = str(Path(sys.executable).with_name("ldmserve"))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDMSERVE_")}
    return {**env, "LDMSERVE_DRAIN_TIMEOUT_S": "10"}


def _up(port: int, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [LDMSERVE, "up", "--port", str(port), "--data-dir", str(data_dir)],
            env=_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_up_serves_a_job_and_a_second_up_reuses_the_data(tmp_path: Path) -> None:
    assert shutil.which(LDMSERVE), "the ldmserve console script is installed"
    port, data = free_port(), tmp_path / "data"
    base = f"http://127.0.0.1:{port}"
    proc = _up(port, data, tmp_path / "up1.log")
    try:
        wait_until(lambda: _ready(base) or proc.poll() is not None, 180, "ldmserve up to be ready")
        assert proc.poll() is None, (tmp_path / "up1.log").read_text()[-3000:]
        log = (tmp_path / "up1.log").read_text()
        assert "demo model" in log and "--model" in log, (
            "the demo log line says how to use a real model"
        )
        job = httpx.post(
            f"{base}/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 3}
        ).json()
        wait_until(
            lambda: httpx.get(f"{base}/v1/jobs/{job['id']}").json()["status"] == "succeeded",
            120,
            "the job",
        )
        image = httpx.get(f"{base}/v1/jobs/{job['id']}/images/0")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    finally:
        assert stop(proc, signal.SIGINT, timeout=60) == 0, (tmp_path / "up1.log").read_text()[
            -3000:
        ]
    assert "stopped" in (tmp_path / "up1.log").read_text()
    assert list((data / "redis").glob("appendonly*")), (
        "the embedded Redis keeps an append-only file"
    )

    proc = _up(port, data, tmp_path / "up2.log")
    try:
        wait_until(lambda: _ready(base) or proc.poll() is not None, 180, "the second ldmserve up")
        assert httpx.get(f"{base}/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    finally:
        assert stop(proc, signal.SIGINT, timeout=60) == 0


def test_generate_writes_images(tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    subprocess.run(
        [LDMSERVE, "generate", "--model", "demo", "--prompt", "p", "--width", "64", "--height", "96",
         "--steps", "2", "--num-images", "2", "--out", str(out)],
        check=True, env=_env(), capture_output=True, timeout=120,
    )  # fmt: skip
    for path in (out, tmp_path / "img-1.png"):
        with Image.open(path) as image:
            assert image.size == (64, 96)


def test_generate_inpaints_from_files_like_the_library(tmp_path: Path) -> None:
    from model import load_pipeline
    from tests.test_pipeline_image_modes import hard_mask, source_image

    source, mask, out = tmp_path / "src.png", tmp_path / "mask.png", tmp_path / "out.png"
    source_image(64, 64).save(source)
    hard_mask(64, 64).save(mask)
    subprocess.run(
        [LDMSERVE, "generate", "--model", "demo", "--prompt", "p", "--image", str(source),
         "--mask", str(mask), "--strength", "0.75", "--steps", "4", "--sampler", "ddim",
         "--seed", "9", "--keep-unmasked", "--out", str(out)],
        check=True, env=_env(), capture_output=True, timeout=120,
    )  # fmt: skip
    (expected,) = load_pipeline("demo").generate(
        "p", image=source_image(64, 64), mask=hard_mask(64, 64), strength=0.75, steps=4,
        sampler="ddim", seed=9, keep_unmasked=True,
    )  # fmt: skip
    with Image.open(out) as got:
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(expected))
    bad = subprocess.run(
        [LDMSERVE, "generate", "--model", "demo", "--prompt", "p", "--image", str(source),
         "--strength", "0.1", "--steps", "4", "--out", str(out)],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "leaves no step" in bad.stderr


def test_health_probe_fails_without_a_server() -> None:
    env = {**_env(), "LDMSERVE_PORT": str(free_port())}
    assert subprocess.run([LDMSERVE, "health", "api"], env=env, timeout=30).returncode == 1


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDMSERVE_MAX_BATCH", "4")
    monkeypatch.setenv("LDMSERVE_MODEL", "from-env")
    args = build_parser().parse_args(["worker", "--max-batch", "32"])
    settings = settings_from(args)
    assert settings.max_batch == 32 and settings.model == "from-env"


def test_up_exits_when_a_child_dies_quickly(tmp_path: Path) -> None:
    """A worker that cannot load its model takes `up` down with a non-zero code, not a hang."""
    port = free_port()
    with (tmp_path / "up.log").open("ab") as out:
        proc = subprocess.Popen(
            [LDMSERVE, "up", "--port", str(port), "--data-dir", str(tmp_path / "d"), "--model", str(tmp_path / "missing.safetensors")],
            env=_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    start = time.monotonic()
    code = proc.wait(timeout=180)
    assert code == 1 and time.monotonic() - start < 180
    assert "missing.safetensors: no such file" in (tmp_path / "up.log").read_text()


def test_health_worker_sees_only_this_hosts_live_heartbeat(redis_url: str) -> None:
    import asyncio
    import socket

    from service.queue import WorkerInfo, WorkerQueue
    from service.settings import Settings

    env = {**_env(), "LDMSERVE_REDIS_URL": redis_url}
    assert subprocess.run([LDMSERVE, "health", "worker"], env=env, timeout=30).returncode == 1

    async def beat(worker_id: str) -> None:
        queue = WorkerQueue.connect(Settings(redis_url=redis_url))
        await queue.heartbeat(WorkerInfo(worker_id, "demo", 8, "cpu", 0.0))
        await queue.aclose()

    asyncio.run(beat("some-other-host-1-abc"))
    assert subprocess.run([LDMSERVE, "health", "worker"], env=env, timeout=30).returncode == 1
    asyncio.run(beat(f"{socket.gethostname()}-1-abc"))
    assert subprocess.run([LDMSERVE, "health", "worker"], env=env, timeout=30).returncode == 0
