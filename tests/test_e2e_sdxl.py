"""SDXL over HTTP with real processes (redis-server, `ldmserve api`, a worker serving the tiny
SDXL folder): jobs submitted together (second prompts, an empty negative prompt, two sizes)
succeed and equal `generate()`; the worker publishes SDXL's capabilities, so a field the base
model does not read is a 422 at submit."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model import load_pipeline
from model.samplers import SD15_SCHEDULER_CONFIG
from tests.processes import (
    model_stack,
    wait_job,
)
from tests.reference_sdxl import build_sdxl_reference
from tests.test_pipeline_samplers import write_scheduler_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("e2e-sdxl")
    folder = root / "sdxl"
    build_sdxl_reference().save_pretrained(folder, safe_serialization=True)
    write_scheduler_config(folder, SD15_SCHEDULER_CONFIG)
    env = {"LDMSERVE_MODEL": str(folder)}
    with model_stack(root, [str(folder)], env, env) as base:
        yield {"base": base, "folder": folder}


def test_sdxl_jobs_over_http_equal_the_library(stack: dict[str, Any]) -> None:
    bodies = [
        {"prompt": "a red fox", "prompt_2": "oil painting", "negative_prompt": "blurry",
         "width": 64, "height": 64, "steps": 6, "sampler": "euler", "seed": 3, "num_images": 2},
        {"prompt": "a blue whale", "width": 64, "height": 64, "steps": 8, "sampler": "dpmpp_2m",
         "seed": 4, "guidance_scale": 5.0},
        {"prompt": "a castle", "negative_prompt": "dark", "negative_prompt_2": "grainy",
         "width": 64, "height": 72, "steps": 5, "sampler": "euler_a", "seed": 5},
    ]  # fmt: skip
    with httpx.Client(base_url=stack["base"], timeout=60) as client:
        caps = client.get("/v1/models").json()["models"][0]["capabilities"]
        assert caps["family"] == "sdxl" and caps["fields"] == ["prompt_2", "negative_prompt_2"]
        refused = client.post("/v1/jobs", json={"prompt": "x", "aesthetic_score": 7.0})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "aesthetic_score"

        def submit(body: dict[str, Any]) -> str:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            return r.json()["id"]

        with ThreadPoolExecutor(len(bodies)) as pool:
            ids = list(pool.map(submit, bodies))
        views = [wait_job(client, job_id) for job_id in ids]
        library = load_pipeline(str(stack["folder"]), device="cpu")
        for body, view in zip(bodies, views, strict=True):
            assert view["status"] == "succeeded", view
            expected = library.generate(**body)
            assert len(view["images"]) == len(expected)
            for link, want in zip(view["images"], expected, strict=True):
                got = Image.open(io.BytesIO(client.get(link["url"]).content)).convert("RGB")
                diff = np.abs(np.asarray(got).astype(int) - np.asarray(want).astype(int)).max()
                assert diff <= 2, (body["prompt"], diff)


def test_a_size_less_sdxl_job_gets_the_native_size(stack: dict[str, Any]) -> None:
    """The tiny folder's native size (sample_size 32 x 8 = 256; SDXL's own folders: 1024)."""
    with httpx.Client(base_url=stack["base"], timeout=60) as client:
        r = client.post("/v1/jobs", json={"prompt": "x", "steps": 1, "guidance_scale": 1.0})
        assert r.status_code == 202, r.text
        view = wait_job(client, r.json()["id"])
        assert view["status"] == "succeeded", view
        png = client.get(view["images"][0]["url"]).content
        assert Image.open(io.BytesIO(png)).size == (256, 256)
