"""The x4 upscaler end to end with real processes (redis-server, `ldmserve api`, a worker
loading the tiny StableDiffusionUpscalePipeline folder): GET /v1/models lists mode upscale,
factor 4, the output limit and `noise_level`; an upscale job with a prompt, a negative prompt,
guidance and a noise level answers an image 4x the input that equals `generate()`; requests
it cannot run are 422s naming the field, before anything is queued."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model import load_pipeline
from tests.processes import model_stack, wait_job
from tests.reference_x4 import build_x4_reference, low_res_input, save_x4_reference
from tests.test_e2e_image_modes import b64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("e2e-x4")
    folder = save_x4_reference(build_x4_reference("test"), root / "x4")
    env = {"LDMSERVE_MODEL": str(folder)}
    with model_stack(root, [str(folder)], env, env) as base:
        yield {"base": base, "model": str(folder)}


def test_models_list_the_upscaler(stack: dict[str, str]) -> None:
    models = httpx.get(f"{stack['base']}/v1/models").json()["models"]
    caps = {m["id"]: m["capabilities"] for m in models}[stack["model"]]
    assert caps["family"] == "sd-x4-upscaler" and caps["modes"] == ["upscale"]
    assert caps["upscale_factor"] == 4 and caps["upscale_input_multiple"] == 4
    assert caps["max_output_pixels"] == 2048 * 2048 and caps["takes_prompt"]
    assert caps["fields"] == ["noise_level"] and caps["max_noise_level"] == 99


def test_refused_at_submit(stack: dict[str, str]) -> None:
    image = b64(low_res_input(36, 32))  # the API takes sides of 32 px and more
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "image"),  # no image: txt2img, which an upscaler does not run
        ({"image": image, "noise_level": 100}, "noise_level"),  # its UNet embeds 0..99
        ({"image": image, "noise_level": -1}, "noise_level"),
        ({"image": b64(low_res_input(600, 520))}, "image"),  # 2400x2080 > 2048² pixels
        ({"image": image, "width": 128, "height": 128}, "width"),  # 4x is 144x128
        ({"prompt": " "}, "prompt"),  # blank is refused where it is not an upscale
    ]
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        for body, field in cases:
            r = client.post("/v1/jobs", json={"prompt": "a fox", "steps": 2, **body})
            assert r.status_code == 422, (body.keys(), r.text)
            error = r.json()["error"]
            assert error["field"] == field and error["message"], r.text


def test_upscale_job_equals_the_library(stack: dict[str, str]) -> None:
    low = low_res_input(36, 32, seed=4)
    body: dict[str, Any] = {
        "prompt": "a red fox in snow",
        "negative_prompt": "blurry",
        "steps": 4,
        "sampler": "euler_a",
        "guidance_scale": 5.0,
        "noise_level": 30,
        "seed": 5,
        "num_images": 2,
    }
    with httpx.Client(base_url=stack["base"], timeout=60) as client:
        r = client.post("/v1/jobs", json={**body, "image": b64(low)})
        assert r.status_code == 202, r.text
        view = wait_job(client, r.json()["id"])
        assert view["status"] == "succeeded", view
        expected = load_pipeline(stack["model"], device="cpu").generate(image=low, **body)
        assert len(view["images"]) == len(expected) == 2
        for link, want in zip(view["images"], expected, strict=True):
            got = Image.open(io.BytesIO(client.get(link["url"]).content)).convert("RGB")
            assert got.size == want.size == (144, 128)  # 4x the input
            diff = np.abs(np.asarray(got).astype(int) - np.asarray(want).astype(int)).max()
            assert diff <= 2, diff
