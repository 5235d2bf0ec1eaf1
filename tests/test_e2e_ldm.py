"""The text-free LDM families end to end with real processes (redis-server, `ldmserve api`,
one worker per model loaded from a diffusers folder): GET /v1/models lists the unconditional
and upscale modes; unconditional jobs need no prompt and refuse one; upscale jobs take the
low-res `image` and answer 2x (this tiny model's factor) its size; concurrent jobs of one
model batch together in the worker and equal `generate()`."""

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
from tests.processes import (
    model_stack,
    wait_job,
)
from tests.test_e2e_image_modes import b64
from tests.test_ldm_families import build_reference, low_res_image, save_reference
from tests.tiny import BATCHING_SCHEDULER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("e2e-ldm")
    folders = {}
    for family in ("uncond", "sr"):  # as tests/tiny.py BATCHING_SCHEDULER says why
        folders[family] = root / family
        ref = build_reference(family, "test", n_embed=16)
        save_reference(ref, folders[family], BATCHING_SCHEDULER)
    env = {"LDMSERVE_MODEL": str(folders["uncond"])}
    with model_stack(root, [str(f) for f in folders.values()], env, env) as base:
        yield {"base": base, "models": {k: str(v) for k, v in folders.items()}}


def test_models_list_the_modes(stack: dict[str, Any]) -> None:
    models = httpx.get(f"{stack['base']}/v1/models").json()["models"]
    caps = {m["id"]: m["capabilities"] for m in models}
    uncond, sr = caps[stack["models"]["uncond"]], caps[stack["models"]["sr"]]
    assert uncond["modes"] == ["unconditional"] and not uncond["takes_prompt"]
    assert sr["modes"] == ["upscale"] and sr["upscale_factor"] == 2 and not sr["takes_prompt"]
    assert sr["max_output_pixels"] == 2048 * 2048


def test_refused_at_submit(stack: dict[str, Any]) -> None:
    image = b64(low_res_image((64, 32)))
    sr = stack["models"]["sr"]
    cases = [
        ({"prompt": "a face"}, "prompt"),
        ({"model": sr, "image": image, "width": 64, "height": 64}, "width"),
        ({"model": sr, "image": image, "mask": b64(Image.new("L", (64, 32)))}, "mask"),
        ({"model": sr}, "image"),
        ({"image": image}, "image"),
        ({"strength": 0.5}, "strength"),
    ]
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        for body, field in cases:
            r = client.post("/v1/jobs", json={"steps": 2, **body})
            assert r.status_code == 422, (body.keys(), r.text)
            assert r.json()["error"]["field"] == field, r.text


def test_jobs_over_http_batch_and_equal_the_library(stack: dict[str, Any]) -> None:
    sr, low = stack["models"]["sr"], low_res_image((64, 32))
    bodies = [
        {"steps": 8, "sampler": "ddim", "seed": 3, "num_images": 2},
        {"steps": 6, "sampler": "pndm", "seed": 4},
        {"model": sr, "image": b64(low), "steps": 8, "sampler": "ddim", "seed": 5},
        {"model": sr, "image": b64(low), "steps": 6, "sampler": "euler", "seed": 6},
    ]
    with httpx.Client(base_url=stack["base"], timeout=60) as client:

        def submit(body: dict[str, Any]) -> str:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            return r.json()["id"]

        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(submit, bodies))
        views = [wait_job(client, job_id) for job_id in ids]
        libraries = {k: load_pipeline(v, device="cpu") for k, v in stack["models"].items()}
        for body, view in zip(bodies, views, strict=True):
            assert view["status"] == "succeeded", view
            kw = {k: v for k, v in body.items() if k not in ("model", "image")}
            pipe = libraries["sr" if "model" in body else "uncond"]
            expected = pipe.generate(image=low if "image" in body else None, **kw)
            assert len(view["images"]) == len(expected)
            for link, want in zip(view["images"], expected, strict=True):
                got = Image.open(io.BytesIO(client.get(link["url"]).content)).convert("RGB")
                assert got.size == want.size == ((128, 64) if "image" in body else (64, 64))
                diff = np.abs(np.asarray(got).astype(int) - np.asarray(want).astype(int)).max()
                assert diff <= 2, (body, diff)
