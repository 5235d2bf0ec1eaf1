"""LoRA end to end with real processes (redis-server, `ldmserve api`, a demo worker with
LDMSERVE_LORA_DIR): the worker publishes its adapters (GET /v1/loras), an unknown name or too
many adapters is a 422 at submit, concurrent jobs with different adapters (field and prompt
tag) equal `generate()` with the same adapters, and a corrupt file fails only its job."""

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
from tests import lora_kit
from tests.processes import (
    model_stack,
    wait_job,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("e2e-lora")
    loras = lora_kit.write_demo_loras(load_pipeline("demo", device="cpu"), root / "loras")
    with model_stack(root, ["demo"], {"LDMSERVE_MAX_LORAS_PER_JOB": "2"},
                     {"LDMSERVE_LORA_DIR": str(loras)}) as base:  # fmt: skip
        yield {"base": base, "loras": loras}


def test_workers_publish_their_adapters_and_unknown_ones_are_refused(
    stack: dict[str, Any],
) -> None:
    with httpx.Client(base_url=stack["base"], timeout=30) as client:
        listed = client.get("/v1/loras").json()["loras"]
        assert [lo["name"] for lo in listed] == ["broken", "ink", "neon"]
        assert listed[0]["models"] == ["demo"]
        for body, field in [
            ({"prompt": "x", "loras": [{"name": "nowhere"}]}, "loras"),
            ({"prompt": "x <lora:nowhere:0.5>"}, "loras"),
            ({"prompt": "x", "loras": [{"name": n} for n in ("ink", "neon", "broken")]}, "loras"),
            ({"prompt": "x", "loras": [{"name": "../ink"}]}, "loras.0.name"),
        ]:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


def test_concurrent_jobs_with_different_adapters(stack: dict[str, Any]) -> None:
    base = {"steps": 6, "sampler": "euler", "width": 64, "height": 64}
    bodies = [
        {"prompt": "a red fox", "seed": 1, **base},
        {"prompt": "a red fox", "seed": 1, "loras": [{"name": "ink", "scale": 0.8}], **base},
        {"prompt": "a boat <lora:neon:1.2>", "seed": 2, **base},
        {"prompt": "moss", "seed": 3, "loras": [{"name": "ink"}, {"name": "neon"}], **base},
        {"prompt": "moss", "seed": 3, "loras": [{"name": "broken"}], **base},
    ]
    with httpx.Client(base_url=stack["base"], timeout=60) as client:

        def submit(body: dict[str, Any]) -> str:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            return r.json()["id"]

        with ThreadPoolExecutor(len(bodies)) as pool:
            views = [wait_job(client, i) for i in pool.map(submit, bodies)]
        broken = views.pop()
        assert broken["status"] == "failed", broken
        assert "broken.safetensors" in broken["error"]["message"], broken
        demo = load_pipeline("demo", device="cpu", lora_dir=stack["loras"])
        expected = [
            demo.generate("a red fox", seed=1, **base),
            demo.generate("a red fox", seed=1, loras=[{"name": "ink", "scale": 0.8}], **base),
            demo.generate("a boat", seed=2, loras=[{"name": "neon", "scale": 1.2}], **base),
            demo.generate("moss", seed=3, loras=[{"name": "ink"}, {"name": "neon"}], **base),
        ]
        got = []
        for view, want in zip(views, expected, strict=True):
            assert view["status"] == "succeeded", view
            png = client.get(view["images"][0]["url"]).content
            got.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int))
            assert np.abs(got[-1] - np.asarray(want[0]).astype(int)).max() <= 2
        assert np.abs(got[0] - got[1]).max() > 20, "the adapter changes the image"
